//! One handle type for any log backend, so that a server is written once over
//! [`EventLog`] + [`SubscriptionStore`] and the backend is chosen where it is constructed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use herald_core::{Hub, Notification, Watermark};

use crate::{
    AppendError, AppendOptions, Appended, EventLog, LogBounds, LogError, ReadError,
    SubscriptionRecord, SubscriptionStore,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe mirror of [`EventLog`] + [`SubscriptionStore`] (their methods return
/// `impl Future`, which a trait object cannot).
trait Backend: Send + Sync + 'static {
    fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> BoxFuture<'_, Result<Appended, AppendError>>;
    fn read(
        &self,
        after: Watermark,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Notification>, ReadError>>;
    fn bounds(&self) -> Result<LogBounds, LogError>;
    fn stored_bytes(&self) -> Option<u64>;
    fn pipelines_sequences(&self) -> bool;
    fn hub(&self) -> &Hub;
    fn shutdown(&self) -> BoxFuture<'_, Result<(), LogError>>;
    fn put_subscription<'a>(
        &'a self,
        id: &'a str,
        spec: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), LogError>>;
    fn delete_subscription<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, LogError>>;
    fn ack<'a>(&'a self, id: &'a str, w: Watermark) -> BoxFuture<'a, Result<bool, LogError>>;
    fn set_inflight<'a>(
        &'a self,
        id: &'a str,
        w: Watermark,
    ) -> BoxFuture<'a, Result<bool, LogError>>;
    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<SubscriptionRecord>, LogError>>;
}

impl<T: EventLog + SubscriptionStore> Backend for T {
    fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> BoxFuture<'_, Result<Appended, AppendError>> {
        Box::pin(EventLog::append(self, batch, options))
    }
    fn read(
        &self,
        after: Watermark,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Notification>, ReadError>> {
        Box::pin(EventLog::read(self, after, limit))
    }
    fn bounds(&self) -> Result<LogBounds, LogError> {
        EventLog::bounds(self)
    }
    fn stored_bytes(&self) -> Option<u64> {
        EventLog::stored_bytes(self)
    }
    fn pipelines_sequences(&self) -> bool {
        EventLog::pipelines_sequences(self)
    }
    fn hub(&self) -> &Hub {
        EventLog::hub(self)
    }
    fn shutdown(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(EventLog::shutdown(self))
    }
    fn put_subscription<'a>(
        &'a self,
        id: &'a str,
        spec: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(SubscriptionStore::put_subscription(self, id, spec))
    }
    fn delete_subscription<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, LogError>> {
        Box::pin(SubscriptionStore::delete_subscription(self, id))
    }
    fn ack<'a>(&'a self, id: &'a str, w: Watermark) -> BoxFuture<'a, Result<bool, LogError>> {
        Box::pin(SubscriptionStore::ack(self, id, w))
    }
    fn set_inflight<'a>(
        &'a self,
        id: &'a str,
        w: Watermark,
    ) -> BoxFuture<'a, Result<bool, LogError>> {
        Box::pin(SubscriptionStore::set_inflight(self, id, w))
    }
    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<SubscriptionRecord>, LogError>> {
        Box::pin(SubscriptionStore::subscriptions(self))
    }
}

/// A log of any backend behind one cheap-to-clone handle: what a server holds, so that
/// switching backends changes the line that opens the log and nothing else. The cost is one
/// boxed future per call, small beside an fsync or a page read.
///
/// ```
/// use herald_core::Hub;
/// use herald_log::{EmbeddedLog, EventLog, LogOptions, SharedLog};
///
/// let dir = tempfile::tempdir().unwrap();
/// let log = SharedLog::new(EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap());
/// assert_eq!(log.bounds().unwrap().last.0, 0);
/// ```
#[derive(Clone)]
pub struct SharedLog(Arc<dyn Backend>);

impl std::fmt::Debug for SharedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLog").finish_non_exhaustive()
    }
}

impl SharedLog {
    /// Wraps a backend.
    pub fn new(backend: impl EventLog + SubscriptionStore) -> SharedLog {
        SharedLog(Arc::new(backend))
    }
}

impl EventLog for SharedLog {
    fn append(
        &self,
        batch: Vec<Notification>,
        options: AppendOptions,
    ) -> impl Future<Output = Result<Appended, AppendError>> + Send {
        self.0.append(batch, options)
    }

    fn read(
        &self,
        after: Watermark,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Notification>, ReadError>> + Send {
        self.0.read(after, limit)
    }

    fn bounds(&self) -> Result<LogBounds, LogError> {
        self.0.bounds()
    }

    fn stored_bytes(&self) -> Option<u64> {
        self.0.stored_bytes()
    }

    fn pipelines_sequences(&self) -> bool {
        self.0.pipelines_sequences()
    }

    fn hub(&self) -> &Hub {
        self.0.hub()
    }

    fn shutdown(&self) -> impl Future<Output = Result<(), LogError>> + Send {
        self.0.shutdown()
    }
}

impl SubscriptionStore for SharedLog {
    async fn put_subscription(&self, id: &str, spec: Vec<u8>) -> Result<(), LogError> {
        self.0.put_subscription(id, spec).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, LogError> {
        self.0.delete_subscription(id).await
    }

    async fn ack(&self, id: &str, watermark: Watermark) -> Result<bool, LogError> {
        self.0.ack(id, watermark).await
    }

    async fn set_inflight(&self, id: &str, through: Watermark) -> Result<bool, LogError> {
        self.0.set_inflight(id, through).await
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, LogError> {
        self.0.subscriptions().await
    }
}
