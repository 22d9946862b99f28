//! The OpenAI-compatible API: request bodies ([`request`]), their checks into
//! what the scheduler runs ([`params`]) and the response bodies ([`response`]).

pub mod params;
pub mod request;
pub mod response;
