//! The console's page, embedded in the binary: no CDN, no files to install. The page holds
//! no data, so it is served without the bearer token; everything it shows comes from the
//! JSON endpoints, which ask for it (the page keeps the token in the tab's session storage).

use super::server::Reply;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The asset at `path`, if `path` is one of the console's.
pub fn asset(path: &str) -> Option<Reply> {
    match path {
        "/" | "/console" | "/console/" => Some((200, "text/html; charset=utf-8", INDEX.to_owned())),
        "/console/console.js" => Some((200, "text/javascript; charset=utf-8", SCRIPT.to_owned())),
        "/console/console.css" => Some((200, "text/css; charset=utf-8", STYLE.to_owned())),
        _ => None,
    }
}
