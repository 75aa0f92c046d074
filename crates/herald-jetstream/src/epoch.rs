//! Watermarks never go back: each node remembers, in its data directory, which stream it
//! followed (the stream's creation time) and the highest watermark it saw. A stream that is
//! missing is created so that its sequence continues after that watermark; a stream that was
//! recreated by someone else and starts lower is refused at start (its watermarks would name
//! other events than the ones clients hold).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a node remembers of its stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Epoch {
    /// The stream's creation time, as JetStream reports it.
    pub(crate) created: String,
    /// The highest watermark the node saw.
    pub(crate) last: u64,
}

/// The file of stream `stream` in `dir`.
pub(crate) fn path(dir: &Path, stream: &str) -> PathBuf {
    dir.join(format!("jetstream-{stream}.json"))
}

/// What was recorded, if anything (an unreadable file is an error: it is the only memory).
pub(crate) fn load(file: &Path) -> std::io::Result<Option<Epoch>> {
    match std::fs::read(file) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records `epoch` (written beside, then renamed: never half-written).
pub(crate) fn store(file: &Path, epoch: &Epoch) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        herald_log::create_data_dir(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(epoch).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, file)
}
