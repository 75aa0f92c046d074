//! Exchange's notification ROPs (MS-OXCNOTIF) and the MAPI/HTTP messages that carry them,
//! encoded byte-exact and decoded without panics or unchecked allocations.
//!
//! - [`RegisterNotification`] (0x29) in both readings of its `NotificationTypes` width,
//!   [`RopNotify`] (0x2A) with every [`NotificationData`] variant and the spec's presence
//!   rules ([`Presence`]), RopPending (0x6E), [`Release`] (0x01), and the [`Logon`] and
//!   [`OpenFolder`] requests a client sends before subscribing.
//! - [`RopBuffer`]: RPC_HEADER_EXT framing of a RopsList and its handle table.
//! - [`mapihttp`]: Connect, Execute, Disconnect and NotificationWait bodies and the
//!   `PROCESSING`/`PENDING`/`DONE` response stream.
//! - [`GlobalId`]: FID/MID, a replica id and a big-endian 48-bit counter.
//!
//! Errors say which field at which offset. No dependency on the rest of Herald.
//!
//! ```
//! use herald_rop::{GlobalId, NotificationData, NotificationType, NewMailInfo, RopNotify};
//! let mut d = NotificationData::empty(NotificationType::NewMail, true);
//! d.folder_id = Some(GlobalId::new(1, 5));
//! d.message_id = Some(GlobalId::new(1, 0x123));
//! d.new_mail = Some(NewMailInfo { message_flags: 0, unicode: false, message_class: "IPM.Note".into() });
//! let bytes = RopNotify { handle: 0x10, logon_id: 0, data: d }.to_bytes().unwrap();
//! assert_eq!(&bytes[..8], &[0x2A, 0x10, 0, 0, 0, 0, 0x02, 0x80]);
//! ```

mod ids;
pub mod lz77;
pub mod mapihttp;
mod notify;
mod rops;
mod rpc;
mod wire;

pub use ids::{Fid, GlobalId, MAX_COUNTER, Mid};
pub use notify::{
    FLAG_MESSAGE, FLAG_SEARCH, FLAG_TOTAL, FLAG_UNREAD, NewMailInfo, NotificationData,
    NotificationType, Presence, ROP_NOTIFY, RopNotify, RowChange, RowId, TYPE_MASK, TableEvent,
    Tags,
};
pub use rops::{
    Logon, LogonSuccess, NotificationScope, OpenFolder, OpenFolderSuccess, ROP_LOGON,
    ROP_OPEN_FOLDER, ROP_PENDING, ROP_REGISTER_NOTIFICATION, ROP_RELEASE, RegisterNotification,
    Release, RopRequest, RopResponse, TYPE_EXTENDED, TypesWidth, decode_requests, decode_responses,
};
pub use rpc::{HEADER_COMPRESSED, HEADER_LAST, HEADER_XOR_MAGIC, MAX_PAYLOAD, RopBuffer};
pub use wire::{DecodeError, EncodeError, Put, Reader};

/// Error and status values used on the wire.
pub mod ec {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// The ROP buffer cannot be read (Execute ErrorCode).
    pub const RPC_FORMAT: u32 = 0x0000_04B6;
    /// A handle index names no object.
    pub const NULL_OBJECT: u32 = 0x0000_04B9;
    /// The handle was released.
    pub const INVALID_OBJECT: u32 = 0x8004_0108;
    /// The object is not found (unknown folder).
    pub const NOT_FOUND: u32 = 0x8004_010F;
    /// The operation is not supported.
    pub const NOT_SUPPORTED: u32 = 0x8004_0102;
    /// A parameter is invalid.
    pub const INVALID_PARAM: u32 = 0x8007_0057;
    /// Access denied (another user's mailbox, another logon's handle).
    pub const ACCESS_DENIED: u32 = 0x8007_0005;
    /// A value is too big (UDP push context over 16 bytes).
    pub const TOO_BIG: u32 = 0x8004_0305;
    /// The request was rejected (a second outstanding wait).
    pub const REJECTED: u32 = 0x0000_07EE;
    /// The server is shutting down.
    pub const EXITING: u32 = 0x0000_03ED;
    /// The login failed.
    pub const LOGIN_FAILURE: u32 = 0x8004_0111;
    /// Not enough memory for what was asked (MAPI_E_NOT_ENOUGH_MEMORY): a per-session limit.
    pub const NOT_ENOUGH_MEMORY: u32 = 0x8007_000E;
    /// The server is out of resources for now (ecServerOOM): retry later.
    pub const SERVER_MEMORY: u32 = 0x0000_03F0;
    /// A buffer is too large (RopBufferSize, MaxRopOut, aux).
    pub const BUFFER_TOO_LARGE: u32 = 0x0000_06F7;
    /// A buffer is too small (MaxRopOut under 8).
    pub const BUFFER_TOO_SMALL: u32 = 0x8004_0115;
}

#[cfg(test)]
mod tests;
