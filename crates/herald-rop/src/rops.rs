//! The ROPs around notifications: RopLogon, RopOpenFolder, RopRegisterNotification,
//! RopRelease (requests), their responses, RopPending, and the generic failure response.
//! [`decode_requests`] reads a RopsList; [`decode_responses`] reads one back (for clients).

use crate::ids::{Fid, GlobalId, Mid};
use crate::notify::RopNotify;
use crate::wire::{DecodeError, EncodeError, Put, Reader};

/// RopRelease's id.
pub const ROP_RELEASE: u8 = 0x01;
/// RopOpenFolder's id.
pub const ROP_OPEN_FOLDER: u8 = 0x02;
/// RopRegisterNotification's id.
pub const ROP_REGISTER_NOTIFICATION: u8 = 0x29;
/// RopPending's id.
pub const ROP_PENDING: u8 = 0x6E;
/// RopLogon's id.
pub const ROP_LOGON: u8 = 0xFE;

/// RopIds that exist only in responses (MS-OXCROPS 2.2.1: RopNotify, RopPending, RopBackoff,
/// RopBufferTooSmall). A request RopsList holding one is malformed: answering it as an
/// unsupported ROP would write a failure a client reads as that response.
const RESPONSE_ONLY: [u8; 4] = [crate::notify::ROP_NOTIFY, ROP_PENDING, 0xF9, 0xFF];

/// Bit of NotificationTypes that adds a Reserved byte to RopRegisterNotification.
pub const TYPE_EXTENDED: u16 = 0x0400;

/// How wide `NotificationTypes` is read in RopRegisterNotification. The spec's u16, with a
/// Reserved byte only when 0x0400 is set, is the default; Microsoft's test client and gromox
/// send a u8 then an always-present Reserved byte. Without 0x0400 both give the same bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TypesWidth {
    /// u16, plus Reserved when 0x0400 is set (MS-OXCNOTIF 2.2.1.2.1.1, MAPI Inspector).
    #[default]
    U16,
    /// u8 plus an always-present Reserved byte (Interop test suite, gromox).
    U8Reserved,
}

/// What a subscription watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationScope {
    /// The whole mailbox (`WantWholeStore` = 1).
    WholeStore,
    /// One folder (`MessageId` = 0).
    Folder(Fid),
    /// One message in its parent folder.
    Message(Fid, Mid),
}

/// RopRegisterNotification request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterNotification {
    /// The logon.
    pub logon_id: u8,
    /// The logon or folder handle's index.
    pub input_handle_index: u8,
    /// Where the subscription handle goes.
    pub output_handle_index: u8,
    /// The notification types (bits of [`crate::NotificationType`], and 0x0400 Extended).
    pub types: u16,
    /// What it watches.
    pub scope: NotificationScope,
}

impl RegisterNotification {
    /// Appends the wire form (the spec's u16 reading; 23 or 7 bytes, +1 with 0x0400).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put(&[
            ROP_REGISTER_NOTIFICATION,
            self.logon_id,
            self.input_handle_index,
            self.output_handle_index,
        ]);
        out.put_u16(self.types);
        if self.types & TYPE_EXTENDED != 0 {
            out.put_u8(0);
        }
        match self.scope {
            NotificationScope::WholeStore => out.put_u8(1),
            NotificationScope::Folder(fid) => {
                out.put_u8(0);
                fid.write(out);
                GlobalId::ZERO.write(out);
            }
            NotificationScope::Message(fid, mid) => {
                out.put_u8(0);
                fid.write(out);
                mid.write(out);
            }
        }
    }

    /// Reads the request after its RopId, with the given reading of `NotificationTypes`.
    pub fn decode_body(r: &mut Reader<'_>, width: TypesWidth) -> Result<Self, DecodeError> {
        let logon_id = r.u8("LogonId")?;
        let input_handle_index = r.u8("InputHandleIndex")?;
        let output_handle_index = r.u8("OutputHandleIndex")?;
        let types = match width {
            TypesWidth::U16 => {
                let t = r.u16("NotificationTypes")?;
                if t & TYPE_EXTENDED != 0 {
                    r.u8("Reserved")?;
                }
                t
            }
            TypesWidth::U8Reserved => {
                let t = u16::from(r.u8("NotificationTypes")?);
                r.u8("Reserved")?;
                t
            }
        };
        let at = r.offset();
        let scope = match r.u8("WantWholeStore")? {
            0 => {
                let fid = GlobalId::read(r, "FolderId")?;
                let mid = GlobalId::read(r, "MessageId")?;
                if mid == GlobalId::ZERO {
                    NotificationScope::Folder(fid)
                } else {
                    NotificationScope::Message(fid, mid)
                }
            }
            1 => NotificationScope::WholeStore,
            v => {
                return Err(DecodeError::Invalid {
                    field: "WantWholeStore",
                    offset: at,
                    value: u64::from(v),
                    why: "must be 0 or 1",
                });
            }
        };
        Ok(RegisterNotification {
            logon_id,
            input_handle_index,
            output_handle_index,
            types,
            scope,
        })
    }
}

/// RopLogon request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logon {
    /// The logon id the client chose.
    pub logon_id: u8,
    /// Where the logon handle goes.
    pub output_handle_index: u8,
    /// `LogonFlags` (0x01 Private).
    pub logon_flags: u8,
    /// `OpenFlags`.
    pub open_flags: u32,
    /// `StoreState` (0).
    pub store_state: u32,
    /// The mailbox's legacy DN (ASCII).
    pub essdn: String,
}

impl Logon {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.put(&[
            ROP_LOGON,
            self.logon_id,
            self.output_handle_index,
            self.logon_flags,
        ]);
        out.put_u32(self.open_flags);
        out.put_u32(self.store_state);
        if self.essdn.is_empty() {
            out.put_u16(0);
            return Ok(());
        }
        let mut dn = Vec::new();
        dn.put_asciiz(&self.essdn, "Essdn")?;
        let n = u16::try_from(dn.len()).map_err(|_| EncodeError {
            field: "EssdnSize",
            why: "too long",
        })?;
        out.put_u16(n);
        out.put(&dn);
        Ok(())
    }

    fn decode_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let logon_id = r.u8("LogonId")?;
        let output_handle_index = r.u8("OutputHandleIndex")?;
        let logon_flags = r.u8("LogonFlags")?;
        let open_flags = r.u32("OpenFlags")?;
        let store_state = r.u32("StoreState")?;
        let size = r.u16("EssdnSize")?;
        let at = r.offset();
        let raw = r.bytes(usize::from(size), "Essdn")?;
        let essdn = match raw.split_last() {
            None => String::new(),
            Some((0, s)) if !s.contains(&0) => s.iter().map(|&b| char::from(b)).collect(),
            Some(_) => {
                return Err(DecodeError::Invalid {
                    field: "Essdn",
                    offset: at,
                    value: u64::from(size),
                    why: "not one NUL-terminated string of EssdnSize bytes",
                });
            }
        };
        Ok(Logon {
            logon_id,
            output_handle_index,
            logon_flags,
            open_flags,
            store_state,
            essdn,
        })
    }
}

/// RopOpenFolder request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFolder {
    /// The logon.
    pub logon_id: u8,
    /// The logon or folder handle's index.
    pub input_handle_index: u8,
    /// Where the folder handle goes.
    pub output_handle_index: u8,
    /// The folder.
    pub folder_id: Fid,
    /// `OpenModeFlags`.
    pub open_mode_flags: u8,
}

impl OpenFolder {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put(&[
            ROP_OPEN_FOLDER,
            self.logon_id,
            self.input_handle_index,
            self.output_handle_index,
        ]);
        self.folder_id.write(out);
        out.put_u8(self.open_mode_flags);
    }
}

/// RopRelease request: ends the object at a handle index (a subscription's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    /// The logon.
    pub logon_id: u8,
    /// The handle's index.
    pub input_handle_index: u8,
}

impl Release {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put(&[ROP_RELEASE, self.logon_id, self.input_handle_index]);
    }
}

/// One request ROP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RopRequest {
    /// RopLogon.
    Logon(Logon),
    /// RopOpenFolder.
    OpenFolder(OpenFolder),
    /// RopRegisterNotification.
    RegisterNotification(RegisterNotification),
    /// RopRelease.
    Release(Release),
    /// A ROP Herald does not serve. Its length is unknown, so reading stops here; the server
    /// answers it with a failure and nothing after it.
    Unsupported {
        /// Its RopId.
        rop_id: u8,
        /// Its LogonId (the second byte of every request ROP).
        logon_id: u8,
        /// Its third byte (InputHandleIndex in every ROP that has one).
        handle_index: u8,
    },
}

impl RopRequest {
    /// Appends the wire form (not for [`RopRequest::Unsupported`], which has none).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            RopRequest::Logon(l) => l.encode(out)?,
            RopRequest::OpenFolder(o) => o.encode(out),
            RopRequest::RegisterNotification(n) => n.encode(out),
            RopRequest::Release(r) => r.encode(out),
            RopRequest::Unsupported { .. } => {
                return Err(EncodeError {
                    field: "RopId",
                    why: "an unsupported ROP has no known form",
                });
            }
        }
        Ok(())
    }
}

/// Reads a request RopsList. A ROP Herald does not know ends the list with
/// [`RopRequest::Unsupported`]; a known ROP that is cut short is an error, and so is a RopId
/// that exists only in responses.
pub fn decode_requests(rops: &[u8], width: TypesWidth) -> Result<Vec<RopRequest>, DecodeError> {
    let mut r = Reader::new(rops);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let at = r.offset();
        let id = r.u8("RopId")?;
        let rop = match id {
            ROP_LOGON => RopRequest::Logon(Logon::decode_body(&mut r)?),
            ROP_OPEN_FOLDER => RopRequest::OpenFolder(OpenFolder {
                logon_id: r.u8("LogonId")?,
                input_handle_index: r.u8("InputHandleIndex")?,
                output_handle_index: r.u8("OutputHandleIndex")?,
                folder_id: GlobalId::read(&mut r, "FolderId")?,
                open_mode_flags: r.u8("OpenModeFlags")?,
            }),
            ROP_REGISTER_NOTIFICATION => {
                RopRequest::RegisterNotification(RegisterNotification::decode_body(&mut r, width)?)
            }
            ROP_RELEASE => RopRequest::Release(Release {
                logon_id: r.u8("LogonId")?,
                input_handle_index: r.u8("InputHandleIndex")?,
            }),
            rop_id if RESPONSE_ONLY.contains(&rop_id) => {
                return Err(DecodeError::Invalid {
                    field: "RopId",
                    offset: at,
                    value: u64::from(rop_id),
                    why: "a ROP that exists only in responses",
                });
            }
            rop_id => {
                let logon_id = r.u8("LogonId").unwrap_or(0);
                let handle_index = r.u8("InputHandleIndex").unwrap_or(0);
                out.push(RopRequest::Unsupported {
                    rop_id,
                    logon_id,
                    handle_index,
                });
                return Ok(out);
            }
        };
        out.push(rop);
    }
    Ok(out)
}

/// RopLogon's answer for a private mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogonSuccess {
    /// `LogonFlags`, echoed.
    pub logon_flags: u8,
    /// The 13 special folders: Root, Deferred Action, Spooler Queue, IPM Subtree, Inbox,
    /// Outbox, Sent Items, Deleted Items, Common Views, Schedule, Search, Views, Shortcuts.
    pub folder_ids: [Fid; 13],
    /// `ResponseFlags` (0x07 for one's own mailbox).
    pub response_flags: u8,
    /// The mailbox GUID (wire order).
    pub mailbox_guid: [u8; 16],
    /// The replica id of the mailbox's ids.
    pub repl_id: u16,
    /// The replica GUID (wire order).
    pub repl_guid: [u8; 16],
    /// Seconds, minutes, hour, day of week, day, month (UTC).
    pub logon_time: [u8; 6],
    /// The year of the logon time.
    pub logon_year: u16,
    /// An opaque change counter.
    pub gwart_time: u64,
    /// `StoreState` (0).
    pub store_state: u32,
}

/// RopOpenFolder's answer for a private folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFolderSuccess {
    /// Whether the folder has rules.
    pub has_rules: bool,
}

/// One response ROP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RopResponse {
    /// RopLogon succeeded.
    Logon {
        /// The handle index.
        output_handle_index: u8,
        /// Its fields.
        success: Box<LogonSuccess>,
    },
    /// RopOpenFolder succeeded.
    OpenFolder {
        /// The handle index.
        output_handle_index: u8,
        /// Its fields.
        success: OpenFolderSuccess,
    },
    /// RopRegisterNotification succeeded (the handle is in the handle table).
    RegisterNotification {
        /// The handle index.
        output_handle_index: u8,
    },
    /// Any ROP that failed: the generic 6-byte form.
    Failure {
        /// The ROP.
        rop_id: u8,
        /// Its OutputHandleIndex (creating ROPs) or InputHandleIndex.
        handle_index: u8,
        /// The error.
        return_value: u32,
    },
    /// A notification.
    Notify(Box<RopNotify>),
    /// More notifications are waiting on this session.
    Pending {
        /// The session's index.
        session_index: u16,
    },
}

impl RopResponse {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            RopResponse::Logon {
                output_handle_index,
                success: s,
            } => {
                out.put(&[ROP_LOGON, *output_handle_index]);
                out.put_u32(0);
                out.put_u8(s.logon_flags);
                for f in s.folder_ids {
                    f.write(out);
                }
                out.put_u8(s.response_flags);
                out.put(&s.mailbox_guid);
                out.put_u16(s.repl_id);
                out.put(&s.repl_guid);
                out.put(&s.logon_time);
                out.put_u16(s.logon_year);
                out.put_u64(s.gwart_time);
                out.put_u32(s.store_state);
            }
            RopResponse::OpenFolder {
                output_handle_index,
                success,
            } => {
                out.put(&[ROP_OPEN_FOLDER, *output_handle_index]);
                out.put_u32(0);
                out.put_u8(u8::from(success.has_rules));
                out.put_u8(0);
            }
            RopResponse::RegisterNotification {
                output_handle_index,
            } => {
                out.put(&[ROP_REGISTER_NOTIFICATION, *output_handle_index]);
                out.put_u32(0);
            }
            RopResponse::Failure {
                rop_id,
                handle_index,
                return_value,
            } => {
                if *return_value == 0 {
                    return Err(EncodeError {
                        field: "ReturnValue",
                        why: "a failure needs a non-zero value",
                    });
                }
                out.put(&[*rop_id, *handle_index]);
                out.put_u32(*return_value);
            }
            RopResponse::Notify(n) => n.encode(out)?,
            RopResponse::Pending { session_index } => {
                out.put_u8(ROP_PENDING);
                out.put_u16(*session_index);
            }
        }
        Ok(())
    }

    /// The wire form as a new vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }
}

fn decode_logon_success(r: &mut Reader<'_>) -> Result<LogonSuccess, DecodeError> {
    let logon_flags = r.u8("LogonFlags")?;
    let mut folder_ids = [GlobalId::ZERO; 13];
    for f in &mut folder_ids {
        *f = GlobalId::read(r, "FolderIds")?;
    }
    let response_flags = r.u8("ResponseFlags")?;
    let mailbox_guid = r.guid("MailboxGuid")?;
    let repl_id = r.u16("ReplId")?;
    let repl_guid = r.guid("ReplGuid")?;
    let mut logon_time = [0u8; 6];
    logon_time.copy_from_slice(r.bytes(6, "LogonTime")?);
    Ok(LogonSuccess {
        logon_flags,
        folder_ids,
        response_flags,
        mailbox_guid,
        repl_id,
        repl_guid,
        logon_time,
        logon_year: r.u16("LogonTime.Year")?,
        gwart_time: r.u64("GwartTime")?,
        store_state: r.u32("StoreState")?,
    })
}

/// Reads a response RopsList: every ROP answer, then RopNotify and RopPending. Each answer is
/// read by its RopId alone (a failure is always the 6-byte form).
pub fn decode_responses(rops: &[u8]) -> Result<Vec<RopResponse>, DecodeError> {
    let mut r = Reader::new(rops);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let at = r.offset();
        let id = r.rest()[0];
        if id == crate::notify::ROP_NOTIFY {
            out.push(RopResponse::Notify(Box::new(RopNotify::decode(&mut r)?)));
            continue;
        }
        r.u8("RopId")?;
        if id == ROP_PENDING {
            out.push(RopResponse::Pending {
                session_index: r.u16("SessionIndex")?,
            });
            continue;
        }
        let index = r.u8("OutputHandleIndex")?;
        let rv = r.u32("ReturnValue")?;
        if rv != 0 {
            out.push(RopResponse::Failure {
                rop_id: id,
                handle_index: index,
                return_value: rv,
            });
            continue;
        }
        out.push(match id {
            ROP_LOGON => RopResponse::Logon {
                output_handle_index: index,
                success: Box::new(decode_logon_success(&mut r)?),
            },
            ROP_OPEN_FOLDER => {
                let has_rules = r.u8("HasRules")? != 0;
                let ghosted_at = r.offset();
                if r.u8("IsGhosted")? != 0 {
                    return Err(DecodeError::Invalid {
                        field: "IsGhosted",
                        offset: ghosted_at,
                        value: 1,
                        why: "public folder replicas are not supported",
                    });
                }
                RopResponse::OpenFolder {
                    output_handle_index: index,
                    success: OpenFolderSuccess { has_rules },
                }
            }
            ROP_REGISTER_NOTIFICATION => RopResponse::RegisterNotification {
                output_handle_index: index,
            },
            other => {
                return Err(DecodeError::Invalid {
                    field: "RopId",
                    offset: at,
                    value: u64::from(other),
                    why: "a successful answer of a ROP this codec does not know",
                });
            }
        });
    }
    Ok(out)
}
