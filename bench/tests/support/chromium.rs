//! A headless Chromium (Debian's `chromium`) driven over its DevTools protocol: navigate,
//! evaluate, click at an element's place on the page, screenshot. Enough for the console's
//! tests, and a real browser running the page's own script.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::WebSocket;

pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    page: WebSocket<TcpStream>,
    next_id: u64,
}

/// The browser, from `FLOWATTR_CHROMIUM` or Debian's path.
fn binary() -> PathBuf {
    let path = std::env::var_os("FLOWATTR_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "no Chromium at {} (Debian's chromium package; ./scripts/test installs it)",
        path.display()
    );
    path
}

impl Chromium {
    pub fn launch() -> Chromium {
        let profile = tempfile::tempdir().expect("a profile directory");
        // The flags a closed machine needs: no sandbox as root, and no background connections
        // to Google's hosts, which this network refuses.
        let child = Command::new(binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1500,950",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let port = devtools_port(profile.path());
        let page_url = page_websocket(port);
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connects to DevTools");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (page, _) = tungstenite::client(page_url.as_str(), stream).expect("DevTools handshake");
        let mut chromium = Chromium {
            child,
            _profile: profile,
            page,
            next_id: 0,
        };
        chromium.call("Page.enable", json!({}));
        chromium.call("Runtime.enable", json!({}));
        chromium
    }

    /// Sends one DevTools command and returns its result, skipping the events in between.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.page
            .send(tungstenite::Message::text(message))
            .expect("sends to the page");
        loop {
            let message = self.page.read().expect("reads from the page");
            let tungstenite::Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if value["id"].as_u64() == Some(id) {
                if let Some(error) = value.get("error") {
                    panic!("{method}: {error}");
                }
                return value["result"].clone();
            }
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(30),
        );
    }

    /// The value of a JavaScript expression (promises awaited), as JSON.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy, and returns its value.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression);
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expression}; the page says: {}",
                self.eval("document.body.innerText.slice(0, 2000)")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A mouse click in the middle of the first element `selector` matches, as a user makes
    /// it: the browser finds what is under the pointer.
    pub fn click(&mut self, selector: &str) {
        let place = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'center', inline: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
        ));
        self.click_at(place[0].as_f64().unwrap(), place[1].as_f64().unwrap());
    }

    /// A mouse click at a point of the viewport.
    pub fn click_at(&mut self, x: f64, y: f64) {
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Types `text` into the input `selector`, replacing what it held.
    pub fn fill(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.value = ''; e.focus(); }})()"
        ));
        self.call("Input.insertText", json!({ "text": text }));
    }

    pub fn screenshot(&mut self, path: &Path) {
        let result = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = result["data"].as_str().expect("image data");
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64 image data");
        std::fs::write(path, png).expect("writes the screenshot");
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port Chromium chose, from the file it writes in its profile.
fn devtools_port(profile: &Path) -> u16 {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Some(port) = text.lines().next().and_then(|line| line.parse().ok())
        {
            return port;
        }
        assert!(Instant::now() < deadline, "Chromium did not open DevTools");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DevTools address of the browser's one page.
fn page_websocket(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("DevTools HTTP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        // DevTools keeps the connection open: read the head, then Content-Length bytes.
        let mut reader = std::io::BufReader::new(stream);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line).expect("DevTools answers");
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a length");
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).expect("the DevTools answer");
        let body = String::from_utf8_lossy(&body);
        if let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(&body)
            && let Some(url) = targets
                .iter()
                .find(|target| target["type"] == "page")
                .and_then(|target| target["webSocketDebuggerUrl"].as_str())
        {
            return url.to_owned();
        }
        assert!(Instant::now() < deadline, "Chromium shows no page");
        std::thread::sleep(Duration::from_millis(100));
    }
}
