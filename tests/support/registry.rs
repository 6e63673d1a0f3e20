//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1, storage in a temporary directory,
//! optionally behind htpasswd authentication; or over HTTPS on this
//! machine's non-loopback address with a certificate from a private CA
//! (made with `openssl`). Stopped when dropped.
//!
//! Shared by `tests/oci.rs` and `host/cli/tests/oci.rs` (`#[path]` include).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Option<Child>,
    /// The address it listens on: 127.0.0.1, or the HTTPS one's.
    host: std::net::IpAddr,
    /// For an HTTPS registry, the PEM file of the CA that signed its
    /// certificate.
    pub ca: Option<PathBuf>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

/// The registry binary: `docker-registry` (Debian) or `registry` (upstream).
fn binary() -> &'static str {
    for name in ["docker-registry", "registry"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("no OCI registry binary: install Debian's docker-registry (tests/setup.sh does)")
}

impl Registry {
    /// Starts a registry; with `users`, requests need one of these
    /// (user, bcrypt-hashed password) logins.
    pub fn start(users: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let mut auth = String::new();
        if !users.is_empty() {
            let htpasswd = dir.path().join("htpasswd");
            let lines: String = users
                .iter()
                .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 5).expect("bcrypt")))
                .collect();
            std::fs::write(&htpasswd, lines).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: msrwasm-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut registry = Self {
            child: None,
            host: [127, 0, 0, 1].into(),
            ca: None,
            port,
            dir,
            config,
        };
        registry.resume();
        registry
    }

    /// Starts a registry serving HTTPS on this machine's non-loopback IPv4
    /// address (msrwasm speaks plain HTTP only to loopback), with a
    /// certificate for that address signed by a CA of its own ([`Self::ca`]).
    pub fn start_tls() -> Self {
        // The address of the route out; no packet is sent.
        let host = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("192.0.2.1:9").and(s.local_addr()))
            .map(|a| a.ip())
            .ok()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .expect("this test needs a non-loopback IPv4 address with a route (an HTTPS registry off loopback)");
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = {
            let l = TcpListener::bind((host, 0)).expect("a free port");
            l.local_addr().unwrap().port()
        };
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl (tests/setup.sh installs it)");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let subject = format!("/CN={host}");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=msrwasm test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &subject,
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            d.join("server.ext"),
            format!("subjectAltName=IP:{host}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        let config = d.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                d.join("data").display(),
                d.join("server.pem").display(),
                d.join("server.key").display(),
            ),
        )
        .unwrap();
        let mut registry = Self {
            child: None,
            host,
            ca: Some(d.join("ca.pem")),
            port,
            dir,
            config,
        };
        registry.resume();
        registry
    }

    /// Starts (again) the registry process on the same port and storage.
    pub fn resume(&mut self) {
        let child = Command::new(binary())
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the registry");
        self.child = Some(child);
        // Ready when /v2/ answers (200, or 401 behind authentication); an
        // HTTPS one when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match self.ca {
                Some(_) => TcpStream::connect((self.host, self.port)).is_ok(),
                None => self.get_status("/v2/").is_some_and(|s| s == 200 || s == 401),
            };
            if ready {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the registry exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "the registry did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the registry process (storage stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `oci://HOST:PORT/` + `path`.
    pub fn reference(&self, path: &str) -> String {
        format!("oci://{}:{}/{path}", self.host, self.port)
    }

    /// Where the registry keeps blob `digest` (`sha256:...`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The status of a plain GET, if the registry answers.
    fn get_status(&self, path: &str) -> Option<u16> {
        let (status, _) = self.http("GET", path, None, &[]).ok()?;
        Some(status)
    }

    /// One HTTP/1.1 request (no authentication); status and body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        if let Some(ct) = content_type {
            req += &format!("Content-Type: {ct}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("not HTTP"))?;
        let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => out[i + 4..].to_vec(),
            None => Vec::new(),
        };
        Ok((status, body))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Truncates `file` to half its size (a corrupt or interrupted blob).
pub fn truncate_half(file: &Path) {
    let len = std::fs::metadata(file).expect("the blob file").len();
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(len / 2).unwrap();
}
