//! The wire forms of Herald's API, shared by the server and its clients so that each is
//! written once: an event as JSON and its mapping to the engine's model ([`json`]), the
//! WebSocket frames ([`ws`]), and the HTTP bodies a client sends or reads ([`http`]).

pub mod http;
pub mod json;
pub mod ws;

pub use json::{EventJson, EventOut, FieldError};
pub use ws::{ClientFrame, ServerFrame};
