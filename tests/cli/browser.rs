//! A person at a browser, for tests: Debian's headless Chromium driven over the DevTools protocol.
//! Clicks and keys are real input events at the element's place on screen, not `element.click()`.
//! The network is cut (every host name resolves to nothing, every proxy is a closed port); only
//! loopback, where the page under test is served, is reached.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn launch() -> Browser {
        let chromium = std::env::var("PIPELINE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(&chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0", "--window-size=1300,900"])
            .args(["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {chromium} (scripts/test installs it): {e}"));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut url = None;
        let mut seen = String::new();
        let mut line = String::new();
        while url.is_none() && stderr.read_line(&mut line).unwrap_or(0) > 0 {
            url = line.trim().strip_prefix("DevTools listening on ").map(str::to_string);
            seen.push_str(&line);
            line.clear();
        }
        let url = url.unwrap_or_else(|| panic!("Chromium did not open its DevTools port:\n{seen}"));
        // Keep draining stderr, or Chromium blocks once the pipe is full.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        let (ws, _) = tungstenite::connect(url.as_str()).unwrap();
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let mut b = Browser { child, ws, session: String::new(), next: 0, _profile: profile };
        let target = b.send(None, "Target.createTarget", json!({"url": "about:blank"}))["targetId"].clone();
        b.session = b.send(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true}))["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({}));
        b
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({"id": self.next, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == self.next {
                assert!(reply["error"].is_null(), "{method}: {}", reply["error"]);
                return reply["result"].clone();
            }
        }
    }

    /// A command to the page.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params)
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": js, "returnByValue": true, "awaitPromise": true}));
        assert!(r["exceptionDetails"].is_null(), "{js}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Wait (up to 20 s) until `js` is truthy; returns its value.
    pub fn wait_for(&mut self, js: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(js);
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let page = self.eval("document.body ? document.body.innerText : ''");
                panic!("timed out waiting for: {js}\nthe page says:\n{}", page.as_str().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("document.readyState === 'complete'");
    }

    pub fn reload(&mut self) {
        self.eval("window.__before_reload = 1");
        self.call("Page.reload", json!({}));
        self.wait_for("window.__before_reload === undefined && document.readyState === 'complete'");
    }

    /// A left click in the middle of the element `selector` names, scrolled into view first.
    pub fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({0}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        );
        let at = self.wait_for(&js);
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        self.call("Input.dispatchMouseEvent", json!({"type": "mouseMoved", "x": x, "y": y}));
        for kind in ["mousePressed", "mouseReleased"] {
            self.call("Input.dispatchMouseEvent", json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}));
        }
    }

    /// Text typed into the focused element.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    /// One key press: a character (`"f"`) or a named key (`"Escape"`).
    pub fn press(&mut self, key: &str) {
        let (code, vk, text) = match key {
            "Escape" => ("Escape".to_string(), 27, None),
            "Enter" => ("Enter".to_string(), 13, Some("\r")),
            c if c.len() == 1 => (format!("Key{}", c.to_uppercase()), c.to_uppercase().as_bytes()[0] as i64, Some(c)),
            other => panic!("no key `{other}` here"),
        };
        let mut down = json!({"type": if text.is_some() { "keyDown" } else { "rawKeyDown" }, "key": key, "code": code, "windowsVirtualKeyCode": vk});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk}));
    }

    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
