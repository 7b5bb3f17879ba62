//! A real token service for Distribution's `auth: token` (the Docker registry v2
//! token flow), on a loopback port: it checks HTTP Basic credentials (or, for an
//! OAuth2 `refresh_token` grant, the refresh token), grants the repository actions
//! asked for in `scope`, and issues JWTs signed RS256 with a key whose self-signed
//! certificate is the registry's `rootcertbundle`; the certificate rides in the
//! token's `x5c` header, which Distribution verifies against that bundle.
//! Signing uses the `openssl` CLI. Failure injection: the next token can be issued
//! already expired (so the registry rejects it while the client still believes it).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// The `service` the registry and the tokens name.
pub const SERVICE: &str = "zest-test-registry";
/// The `iss` of the tokens, as the registry's `issuer` expects.
pub const ISSUER: &str = "zest-test-token-issuer";

struct State {
    user: String,
    pass: String,
    refresh_token: String,
    expires_in: u64,
    key: PathBuf,
    x5c: String,
    issued: AtomicUsize,
    stale_next: AtomicBool,
    tokens: Mutex<Vec<String>>,
}

/// The running token service (a thread; stopped on drop).
pub struct TokenIssuer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// PEM certificate for the registry's `rootcertbundle`.
    pub cert: PathBuf,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

impl TokenIssuer {
    /// Starts a token service accepting `user:pass` (and `refresh_token` for the
    /// refresh grant), whose tokens live `expires_in` seconds. Keys go in `dir`.
    pub fn start(dir: &Path, user: &str, pass: &str, refresh_token: &str, expires_in: u64) -> Self {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let der = dir.join("token-cert.der");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ISSUER}"),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ]);
        openssl(&[
            "x509",
            "-in",
            &cert.display().to_string(),
            "-outform",
            "DER",
            "-out",
            &der.display().to_string(),
        ]);
        let x5c = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(&der).expect("read certificate"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token service");
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(State {
            user: user.into(),
            pass: pass.into(),
            refresh_token: refresh_token.into(),
            expires_in,
            key,
            x5c,
            issued: AtomicUsize::new(0),
            stale_next: AtomicBool::new(false),
            tokens: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut s) = conn {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = handle(&state, &mut s);
                    }
                }
            })
        };
        TokenIssuer {
            port,
            cert,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The token realm URL.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Every token issued (to look for them in logs).
    pub fn tokens(&self) -> Vec<String> {
        self.state.tokens.lock().unwrap().clone()
    }

    /// Issues the next token already expired (past the registry's leeway) while
    /// telling the client it is good for `expires_in`: the registry rejects it.
    pub fn issue_stale_next(&self) {
        self.state.stale_next.store(true, Ordering::SeqCst);
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn handle(state: &State, s: &mut TcpStream) -> std::io::Result<()> {
    // Read the head (bounded), then the body by Content-Length (bounded).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 << 10 {
            return respond(s, "431 Request Header Fields Too Large", "{}");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut authorization = None;
    let mut content_length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(v.trim().to_string()),
                "content-length" => content_length = v.trim().parse().unwrap_or(0).min(64 << 10),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < content_length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/token" {
        return respond(s, "404 Not Found", "{}");
    }
    let mut params = form_pairs(query);
    let (subject, ok) = if method == "POST" {
        params.extend(form_pairs(&String::from_utf8_lossy(&body)));
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let ok = get("grant_type").as_deref() == Some("refresh_token")
            && get("refresh_token").as_deref() == Some(state.refresh_token.as_str())
            && !state.refresh_token.is_empty();
        (state.user.clone(), ok)
    } else {
        let expected = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", state.user, state.pass));
        let ok = authorization.as_deref() == Some(format!("Basic {expected}").as_str());
        (state.user.clone(), ok)
    };
    if !ok {
        return respond(
            s,
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
        );
    }
    // Grant every action asked for on every repository named.
    let mut access = Vec::new();
    for (k, v) in &params {
        if k != "scope" {
            continue;
        }
        for scope in v.split(' ') {
            let mut it = scope.splitn(3, ':');
            let (kind, name, actions) = (it.next(), it.next(), it.next());
            if let (Some(kind), Some(name), Some(actions)) = (kind, name, actions) {
                access.push(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }));
            }
        }
    }
    let issued_at = now();
    let n = state.issued.fetch_add(1, Ordering::SeqCst);
    let exp = if state.stale_next.swap(false, Ordering::SeqCst) {
        issued_at - 600
    } else {
        issued_at + state.expires_in
    };
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [state.x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": exp,
        "nbf": issued_at - 1,
        "iat": issued_at,
        "jti": format!("zest-test-{n}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&state.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(signing_input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return respond(s, "500 Internal Server Error", "{}");
    }
    let token = format!("{signing_input}.{}", b64url(&out.stdout));
    state.tokens.lock().unwrap().push(token.clone());
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": state.expires_in,
    })
    .to_string();
    respond(s, "200 OK", &body)
}
