//! The operator's console at `/console`: a page built from `console/` (TypeScript, bundled by
//! esbuild) into `assets/console/` and embedded here, so the binary serves it with no second
//! process, no CDN and no network. The page itself holds no data: it asks the API, with the
//! operator's key, for everything it shows.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Only this origin's scripts, styles and connections (`'self'` covers its WebSocket); no
/// framing, no plugins, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The console's page; it asks for an API key when the server requires one.
#[utoipa::path(get, path = "/console", tag = "operate", responses((status = 200, description = "The operator's console (HTML)", content_type = "text/html")))]
pub(super) async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_bytes!("../../assets/console/index.html"),
    )
}

/// The console's script.
#[utoipa::path(get, path = "/console/app.js", tag = "operate", responses((status = 200, description = "The console's script", content_type = "text/javascript")))]
pub(super) async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/app.js"),
    )
}

/// The console's style sheet.
#[utoipa::path(get, path = "/console/app.css", tag = "operate", responses((status = 200, description = "The console's style sheet", content_type = "text/css")))]
pub(super) async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_bytes!("../../assets/console/app.css"),
    )
}
