//! The registry client and the content-addressed cache (feature `oci`).
//!
//! Artifacts follow the CNCF "Wasm OCI Artifact" layout: an OCI image
//! manifest whose config has media type `application/vnd.wasm.config.v0+json`
//! and whose one layer, `application/wasm`, holds the module or component
//! bytes. The plugin's `msrwasm.meta` fields travel as the manifest's
//! `org.opencontainers.image.*` annotations.
//!
//! Cache (under the directory given, normally the user cache directory):
//!
//! ```text
//! oci/blobs/sha256/<hex>      wasm layers, by digest (immutable)
//! oci/manifests/sha256/<hex>  OCI manifests, by digest (immutable)
//! oci/refs/<key>.json         tag -> manifest digest, as last pulled
//! oci/follow/<key>.wasm       the content of a followed tag (replaced)
//! ```
//!
//! Every entry is checked against its digest when used; a corrupt one is
//! removed and fetched again. Nothing from a registry is used before its
//! digest is verified: the manifest against `@sha256:` (and the registry's
//! own digest header), the layer against the manifest.
//!
//! Transport: HTTPS with the system roots, plus the PEM certificates of
//! `MSRWASM_REGISTRY_CA`; plain HTTP only to loopback registries, and from
//! them only to loopback hosts. msrwasm makes every request itself
//! (oci-client's requests follow any redirect, and its token exchange sends
//! the credentials to whatever realm the registry names), through one client
//! per push or pull; every URL a registry hands out (the token realm, each
//! redirect, the upload location) must pass `transport_ok` before anything
//! is sent there. Credentials go to the registry itself and to its token
//! realm; a redirect or upload location on another host gets none.
//! Credentials: `MSRWASM_REGISTRY_USER`/`MSRWASM_REGISTRY_PASSWORD`, else the
//! Docker config file (`$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`, credential helpers included), else anonymous.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use oci_client::Reference;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use reqwest::{Method, StatusCode, Url, header};

use super::{Fetch, Fetched, OciError, OciRef, OciSource, sha256_hex};
use crate::files::MAX_PLUGIN_BYTES;
use crate::util::content_hash;

/// Media type of the config blob of a Wasm OCI artifact.
pub(crate) const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Media type of the layer holding the wasm bytes.
pub(crate) const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Older wasm layer media types other tools push (wasm-to-oci, Istio /
/// Solo `wasme`): accepted when pulling.
pub(crate) const LEGACY_WASM_LAYER_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
];
/// OCI image manifest media type.
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker's schema 2 manifest (some registries convert to it).
const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Largest OCI manifest accepted (a wasm artifact's is under 2 KiB).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Most layers (and, apart, manifests) kept in the cache: the newest.
const MAX_CACHED: usize = 64;
/// Largest Docker config or CA file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest token service answer read (a token is a few KiB).
const MAX_TOKEN_BYTES: usize = 256 << 10;
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// How the store reaches registries.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// PEM certificates trusted besides the system roots.
    pub ca: Option<PathBuf>,
    /// User and password for every registry (else the Docker config).
    pub credentials: Option<(String, String)>,
    /// Longest one push or pull may take, all requests included; the
    /// `oci://` plugins of one policy load ([`Fetch::fetch_all`]) share one.
    pub deadline: Duration,
    /// Longest a connection attempt may take.
    pub connect_timeout: Duration,
    /// Longest the registry may stay silent mid-response.
    pub read_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            ca: None,
            credentials: None,
            deadline: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

impl StoreOptions {
    /// Defaults plus `MSRWASM_REGISTRY_CA`, `MSRWASM_REGISTRY_USER` and
    /// `MSRWASM_REGISTRY_PASSWORD` (the two given together or not at all),
    /// and `MSRWASM_REGISTRY_TIMEOUT_S` (the deadline, 1 ..= 3600 s).
    pub fn from_env() -> Result<Self, OciError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let deadline = match var("MSRWASM_REGISTRY_TIMEOUT_S") {
            None => Self::default().deadline,
            Some(v) => match v.parse::<u64>() {
                Ok(s @ 1..=3600) => Duration::from_secs(s),
                _ => {
                    return Err(OciError::Config(format!(
                        "MSRWASM_REGISTRY_TIMEOUT_S = {v:?}: give whole seconds, 1 to 3600"
                    )));
                }
            },
        };
        let credentials = match (var("MSRWASM_REGISTRY_USER"), var("MSRWASM_REGISTRY_PASSWORD")) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => {
                return Err(OciError::Config(
                    "set both MSRWASM_REGISTRY_USER and MSRWASM_REGISTRY_PASSWORD, or neither".into(),
                ));
            }
        };
        Ok(Self {
            ca: var("MSRWASM_REGISTRY_CA").map(PathBuf::from),
            credentials,
            deadline,
            ..Self::default()
        })
    }
}

/// What a pull produced: verified and in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// `sha256:...` of the OCI manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the wasm layer (the plugin's bytes).
    pub layer_digest: String,
    /// The wasm bytes in the cache.
    pub blob: PathBuf,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

impl Pulled {
    /// The layer digest's hex: the plugin's content sha256.
    pub fn sha256(&self) -> &str {
        self.layer_digest.trim_start_matches("sha256:")
    }
}

/// What a push produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// `sha256:...` of the OCI manifest: pin with `@` + this.
    pub manifest_digest: String,
    /// `sha256:...` of the wasm layer.
    pub layer_digest: String,
}

/// The tag -> digest record of `oci/refs/`.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefRecord {
    reference: String,
    manifest: String,
}

/// Pushes and pulls plugins; caches what it pulls. Implements [`Fetch`]
/// for the engine.
pub struct OciStore {
    dir: PathBuf,
    options: StoreOptions,
    /// The certificates of `MSRWASM_REGISTRY_CA`, trusted besides the
    /// system roots.
    http_roots: Vec<reqwest::Certificate>,
    /// Manifest digests whose content this process verified, per
    /// reference: a poll that finds the same digest skips re-hashing.
    verified: Mutex<HashMap<String, Pulled>>,
    /// Registries whose credential lookup is running (see `auth`).
    lookups: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for OciStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", content_hash(bytes))
}

impl OciStore {
    /// A store caching under `cache_dir/oci` (created private to this
    /// user; an existing directory others may write to is refused).
    pub fn open(cache_dir: &Path, options: StoreOptions) -> Result<Self, OciError> {
        let dir = cache_dir.join("oci");
        for sub in ["blobs/sha256", "manifests/sha256", "refs", "follow"] {
            let d = dir.join(sub);
            crate::files::private_dir(&d).map_err(|source| OciError::Io { path: d, source })?;
        }
        let http_roots = match &options.ca {
            Some(path) => {
                let pem = crate::files::read_regular(path, MAX_CONFIG_BYTES)
                    .map_err(|e| OciError::Config(format!("MSRWASM_REGISTRY_CA {}: {e}", path.display())))?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(OciError::Config(format!(
                        "MSRWASM_REGISTRY_CA {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| OciError::Config(format!("MSRWASM_REGISTRY_CA {}: {e}", path.display())))?
            }
            None => Vec::new(),
        };
        Ok(Self {
            dir,
            options,
            http_roots,
            verified: Mutex::new(HashMap::new()),
            lookups: Arc::default(),
        })
    }

    /// The cache directory (`.../oci`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The HTTP client of one push or pull from `r`'s registry: the trusted
    /// roots, the timeouts, HTTPS only unless the registry is on loopback,
    /// and redirects only where [`transport_ok`] allows (at most
    /// [`MAX_REDIRECTS`]). A redirect to another host, port or scheme drops
    /// the `Authorization` header (reqwest does so for every redirect
    /// policy).
    fn http(&self, r: &OciRef) -> Result<reqwest::Client, OciError> {
        let loopback = r.is_loopback();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(TransportError::TooManyRedirects);
            }
            match transport_ok(attempt.url(), loopback) {
                true => attempt.follow(),
                false => {
                    let url = attempt.url().to_string();
                    attempt.error(TransportError::PlainHttp {
                        what: "a redirect to",
                        url,
                    })
                }
            }
        });
        let builder = reqwest::Client::builder();
        // A proxy from the environment (HTTP_PROXY, ALL_PROXY) would carry a
        // loopback registry's plain HTTP, credentials included, off the
        // machine: loopback registries are always reached directly.
        let builder = if loopback { builder.no_proxy() } else { builder };
        builder
            .tls_certs_merge(self.http_roots.iter().cloned())
            .https_only(!loopback)
            .redirect(redirects)
            // A storage service is not told which registry sent the client.
            .referer(false)
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.read_timeout)
            .user_agent(concat!("msrwasm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Config(format!("{r}: HTTP client: {e}")))
    }

    /// Credentials for `r`'s registry, found by `until`: the Docker config
    /// may name a credential helper, a program that can hang. It runs on a
    /// thread of its own, one per registry at a time, so a hung helper
    /// holds one thread however often a follower polls.
    fn auth(&self, r: &OciRef, until: Instant) -> Result<RegistryAuth, OciError> {
        if let Some((user, password)) = &self.options.credentials {
            return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
        }
        let timeout = || OciError::Timeout {
            reference: r.to_string(),
            what: "the Docker credential helper",
            seconds: self.options.deadline.as_secs(),
        };
        /// A registry's entry in `lookups`, removed when dropped (the
        /// lookup ended, panicked, or its thread never started).
        struct Lookup(Arc<Mutex<HashSet<String>>>, String);
        impl Drop for Lookup {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        if !self
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.registry.clone())
        {
            return Err(timeout());
        }
        let lookup = Lookup(self.lookups.clone(), r.registry.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("msrwasm-credentials".into())
            .spawn(move || {
                let auth = docker_auth(&lookup.1);
                drop(lookup);
                let _ = tx.send(auth);
            })
            .map_err(|source| OciError::Io {
                path: PathBuf::from("(thread)"),
                source,
            })?;
        rx.recv_timeout(until.saturating_duration_since(Instant::now()))
            .map_err(|_| timeout())
    }

    /// Runs `work` on a runtime of its own (on a thread of its own, so that
    /// callers inside another async runtime are fine), within the deadline.
    fn block<T: Send>(
        &self,
        r: &OciRef,
        until: Instant,
        work: impl Future<Output = Result<T, OciError>> + Send,
    ) -> Result<T, OciError> {
        let deadline = self.options.deadline;
        let left = until.saturating_duration_since(Instant::now());
        let reference = r.to_string();
        std::thread::scope(|s| {
            let thread = std::thread::Builder::new().name("msrwasm-oci".into());
            let handle = thread
                .spawn_scoped(s, || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| OciError::Io {
                            path: PathBuf::from("(tokio runtime)"),
                            source,
                        })?;
                    runtime.block_on(async {
                        tokio::time::timeout(left, work).await.unwrap_or(Err(OciError::Timeout {
                            reference: reference.clone(),
                            what: "the registry",
                            seconds: deadline.as_secs(),
                        }))
                    })
                })
                .map_err(|source| OciError::Io {
                    path: PathBuf::from("(thread)"),
                    source,
                })?;
            handle
                .join()
                .unwrap_or_else(|_| Err(OciError::Config(format!("{reference}: the registry client panicked"))))
        })
    }

    fn timeout(&self, r: &OciRef) -> OciError {
        OciError::Timeout {
            reference: r.to_string(),
            what: "the registry",
            seconds: self.options.deadline.as_secs(),
        }
    }

    /// Pushes `bytes` (a wasm module or component) to `r` as a Wasm OCI
    /// artifact with `annotations`.
    pub fn push(&self, bytes: &[u8], annotations: BTreeMap<String, String>, r: &OciRef) -> Result<Pushed, OciError> {
        let Some(tag) = r.tag.as_deref().filter(|_| r.digest.is_none()) else {
            return Err(OciError::Config(format!("{r}: push to a tag, not a digest")));
        };
        let component = wasmparser::Parser::is_component(bytes);
        let layer_digest = digest_of(bytes);
        let config = serde_json::json!({
            "architecture": "wasm",
            "os": if component { "wasip2" } else { "wasip1" },
            "layerDigests": [layer_digest],
        });
        let config = serde_json::to_vec(&config).expect("a JSON value serializes");
        let config_digest = digest_of(&config);
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            config: OciDescriptor {
                media_type: WASM_CONFIG_MEDIA_TYPE.into(),
                digest: config_digest.clone(),
                size: config.len() as i64,
                ..OciDescriptor::default()
            },
            layers: vec![OciDescriptor {
                media_type: WASM_LAYER_MEDIA_TYPE.into(),
                digest: layer_digest.clone(),
                size: bytes.len() as i64,
                ..OciDescriptor::default()
            }],
            subject: None,
            artifact_type: None,
            annotations: (!annotations.is_empty()).then_some(annotations),
        };
        let body = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let manifest_digest = digest_of(&body);
        // One deadline for the whole push, credentials included.
        let until = Instant::now() + self.options.deadline;
        let auth = self.auth(r, until)?;
        self.block(r, until, async {
            let session = Session::open(self, r, &auth, Scope::Push).await?;
            session.push_blob(config, &config_digest).await?;
            session.push_blob(bytes.to_vec(), &layer_digest).await?;
            session.push_manifest(body, tag).await
        })?;
        Ok(Pushed {
            manifest_digest,
            layer_digest,
        })
    }

    /// Resolves `r` at the registry now and makes its wasm layer local
    /// (downloading it only when the cache lacks it), verifying every
    /// digest on the way.
    pub fn pull(&self, r: &OciRef) -> Result<Pulled, OciError> {
        self.pull_until(r, Instant::now() + self.options.deadline, &Logins::default())
    }

    /// [`OciStore::pull`] by `until`: credentials, manifest and layer.
    fn pull_until(&self, r: &OciRef, until: Instant, logins: &Logins) -> Result<Pulled, OciError> {
        // Queued behind registries that took the whole deadline.
        if Instant::now() >= until {
            return Err(self.timeout(r));
        }
        let auth = logins.get(self, r, until)?;
        self.block(r, until, async {
            let session = Session::open(self, r, &auth, Scope::Pull).await?;
            let (body, header_digest) = session.manifest().await?;
            let manifest_digest = self.check_manifest(r, &body, header_digest.as_deref())?;
            let key = r.to_string();
            if let Some(known) = self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
                && known.manifest_digest == manifest_digest
                && known.blob.exists()
            {
                return Ok(known.clone());
            }
            let (manifest, layer) = parse_manifest(r, &body)?;
            let hex = sha256_hex(&layer.digest).expect("checked by parse_manifest").to_owned();
            let blob = self.dir.join("blobs/sha256").join(&hex);
            if !self.blob_ok(&blob, &hex) {
                let bytes = session.blob(&layer).await?;
                let actual = digest_of(&bytes);
                if actual != layer.digest {
                    return Err(OciError::Digest {
                        reference: r.to_string(),
                        what: format!("the wasm layer ({} of {} bytes received)", bytes.len(), layer.size),
                        expected: layer.digest.clone(),
                        actual,
                    });
                }
                crate::files::write_atomic(&blob, &bytes).map_err(|source| OciError::Io {
                    path: blob.clone(),
                    source,
                })?;
                self.evict("blobs/sha256");
            }
            self.remember(r, &body, &manifest_digest)?;
            let pulled = Pulled {
                manifest_digest,
                layer_digest: layer.digest.clone(),
                blob,
                annotations: manifest.annotations.unwrap_or_default(),
            };
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, pulled.clone());
            Ok(pulled)
        })
    }

    /// [`Fetch::fetch`] by `until`.
    fn fetch_until(&self, source: &OciSource, until: Instant, logins: &Logins) -> Result<Fetched, OciError> {
        let r = &source.reference;
        if !source.follows() {
            let pulled = match self.cached(r) {
                Some(p) => p,
                None => self.pull_until(r, until, logins)?,
            };
            tracing::info!(reference = %r, digest = %pulled.manifest_digest, "OCI plugin ready");
            return Ok(Fetched {
                path: pulled.blob.clone(),
                sha256: Some(pulled.sha256().to_owned()),
            });
        }
        let pulled = match self.pull_until(r, until, logins) {
            Ok(p) => p,
            // Only an unreachable registry falls back; wrong content never.
            Err(e @ (OciError::Registry { .. } | OciError::Timeout { .. })) => match self.cached(r) {
                Some(p) => {
                    tracing::warn!(
                        "{}; starting from the cached {} (following the tag resumes when the registry answers)",
                        crate::util::error_chain(&e),
                        p.manifest_digest
                    );
                    p
                }
                None => {
                    return Err(OciError::Unavailable {
                        reference: r.to_string(),
                        source: Box::new(e),
                    });
                }
            },
            Err(e) => return Err(e),
        };
        self.follow(r, &pulled)?;
        tracing::info!(reference = %r, digest = %pulled.manifest_digest, "OCI plugin ready; following the tag every {} s", source.poll_s);
        Ok(Fetched {
            path: self.follow_path(r),
            sha256: None,
        })
    }

    /// Checks a manifest's bytes against the pin and the registry's digest
    /// header; returns its digest.
    fn check_manifest(&self, r: &OciRef, body: &[u8], header: Option<&str>) -> Result<String, OciError> {
        if body.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(OciError::NotWasm {
                reference: r.to_string(),
                reason: format!("a {}-byte manifest is not a wasm artifact's", body.len()),
            });
        }
        let actual = digest_of(body);
        for (expected, what) in [
            (r.digest.as_deref(), "the manifest"),
            // (A registry may use another algorithm; sha256 is checked.)
            (
                header.filter(|h| h.starts_with("sha256:")),
                "the manifest (against the registry's digest header)",
            ),
        ] {
            if let Some(expected) = expected
                && expected != actual
            {
                return Err(OciError::Digest {
                    reference: r.to_string(),
                    what: what.into(),
                    expected: expected.to_owned(),
                    actual,
                });
            }
        }
        Ok(actual)
    }

    /// Stores the manifest by digest and, for a tag, the tag's record.
    fn remember(&self, r: &OciRef, body: &[u8], digest: &str) -> Result<(), OciError> {
        let hex = sha256_hex(digest).expect("computed");
        let path = self.dir.join("manifests/sha256").join(hex);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| OciError::Io { path, source }
        };
        crate::files::write_atomic(&path, body).map_err(io(&path))?;
        self.evict("manifests/sha256");
        if r.digest.is_none() {
            let record = RefRecord {
                reference: r.to_string(),
                manifest: digest.to_owned(),
            };
            let path = self.ref_path(r);
            let json = serde_json::to_vec_pretty(&record).expect("serializes");
            crate::files::write_atomic(&path, &json).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Keeps the newest [`MAX_CACHED`] entries of `sub` (an evicted entry
    /// is pulled again when needed).
    fn evict(&self, sub: &str) {
        crate::files::keep_newest(&self.dir.join(sub), MAX_CACHED, |_| true);
    }

    fn key(r: &OciRef) -> String {
        content_hash(r.to_string().as_bytes())[..32].to_owned()
    }

    fn ref_path(&self, r: &OciRef) -> PathBuf {
        self.dir.join("refs").join(format!("{}.json", Self::key(r)))
    }

    /// The followed file of a tag.
    pub fn follow_path(&self, r: &OciRef) -> PathBuf {
        self.dir.join("follow").join(format!("{}.wasm", Self::key(r)))
    }

    /// Whether the cached blob is there with the right digest; a corrupt
    /// one is removed (and so fetched again).
    fn blob_ok(&self, blob: &Path, hex: &str) -> bool {
        match crate::files::read_regular(blob, MAX_PLUGIN_BYTES) {
            Ok(bytes) if crate::util::content_hash(&bytes) == hex => true,
            Err(crate::files::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => false,
            Ok(_) | Err(_) => {
                tracing::warn!(file = %blob.display(), "corrupt OCI cache entry (digest mismatch) removed; fetching it again");
                let _ = std::fs::remove_file(blob);
                false
            }
        }
    }

    /// `r` from the cache alone, verified (`None`: not there, or corrupt).
    pub fn cached(&self, r: &OciRef) -> Option<Pulled> {
        let manifest_digest = match &r.digest {
            Some(d) => d.clone(),
            None => {
                let record = crate::files::read_regular(&self.ref_path(r), MAX_CONFIG_BYTES).ok()?;
                let record: RefRecord = serde_json::from_slice(&record).ok()?;
                (record.reference == r.to_string()).then_some(record.manifest)?
            }
        };
        let hex = sha256_hex(&manifest_digest)?;
        let path = self.dir.join("manifests/sha256").join(hex);
        let body = crate::files::read_regular(&path, MAX_MANIFEST_BYTES).ok()?;
        if digest_of(&body) != manifest_digest {
            tracing::warn!(file = %path.display(), "corrupt OCI cache entry (digest mismatch) removed; fetching it again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let (manifest, layer) = parse_manifest(r, &body).ok()?;
        let layer_hex = sha256_hex(&layer.digest)?;
        let blob = self.dir.join("blobs/sha256").join(layer_hex);
        self.blob_ok(&blob, layer_hex).then(|| Pulled {
            manifest_digest,
            layer_digest: layer.digest.clone(),
            blob,
            annotations: manifest.annotations.unwrap_or_default(),
        })
    }

    /// Makes the followed file of `r` hold `pulled`; returns whether it
    /// changed.
    fn follow(&self, r: &OciRef, pulled: &Pulled) -> Result<bool, OciError> {
        let path = self.follow_path(r);
        let current = crate::files::read_regular(&path, MAX_PLUGIN_BYTES).ok();
        if current.is_some_and(|b| crate::util::content_hash(&b) == pulled.sha256()) {
            return Ok(false);
        }
        let io = |source| OciError::Io {
            path: path.clone(),
            source,
        };
        let bytes = crate::files::read_regular(&pulled.blob, MAX_PLUGIN_BYTES).map_err(|e| match e {
            crate::files::ReadError::Io(source) => io(source),
            other => io(std::io::Error::other(other)),
        })?;
        if crate::util::content_hash(&bytes) != pulled.sha256() {
            let _ = std::fs::remove_file(&pulled.blob);
            return Err(OciError::Digest {
                reference: r.to_string(),
                what: "the cached wasm layer".into(),
                expected: pulled.layer_digest.clone(),
                actual: digest_of(&bytes),
            });
        }
        crate::files::write_atomic(&path, &bytes).map_err(io)?;
        Ok(true)
    }
}

/// The manifest's wasm layer: exactly one layer of a wasm media type,
/// a sha256 digest and a size within the plugin limit.
fn parse_manifest(r: &OciRef, body: &[u8]) -> Result<(OciImageManifest, OciDescriptor), OciError> {
    let not_wasm = |reason: String| OciError::NotWasm {
        reference: r.to_string(),
        reason,
    };
    let manifest: OciImageManifest =
        serde_json::from_slice(body).map_err(|e| not_wasm(format!("not an OCI image manifest: {e}")))?;
    let wasm: Vec<&OciDescriptor> = manifest
        .layers
        .iter()
        .filter(|l| {
            l.media_type == WASM_LAYER_MEDIA_TYPE || LEGACY_WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str())
        })
        .collect();
    let layer = match wasm[..] {
        [one] => one.clone(),
        _ => {
            let types: Vec<&str> = manifest.layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(not_wasm(format!(
                "not a Wasm OCI artifact: expected one `{WASM_LAYER_MEDIA_TYPE}` layer, found [{}]",
                types.join(", ")
            )));
        }
    };
    if sha256_hex(&layer.digest).is_none() {
        return Err(not_wasm(format!("layer digest `{}` is not sha256", layer.digest)));
    }
    if layer.size < 0 || layer.size as u64 > MAX_PLUGIN_BYTES {
        return Err(not_wasm(format!(
            "the wasm layer is {} bytes, over the {} MiB plugin limit",
            layer.size,
            MAX_PLUGIN_BYTES >> 20
        )));
    }
    Ok((manifest, layer))
}

/// Credentials for `registry` from the Docker config (`$DOCKER_CONFIG` or
/// `~/.docker`), running the credential helper it names; else anonymous.
fn docker_auth(registry: &str) -> RegistryAuth {
    let config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"));
    let Some(config) = config else {
        return RegistryAuth::Anonymous;
    };
    let bytes = match crate::files::read_regular(&config, MAX_CONFIG_BYTES) {
        Ok(b) => b,
        Err(crate::files::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return RegistryAuth::Anonymous;
        }
        Err(e) => {
            tracing::warn!("Docker config {}: {e}; pulling anonymously", config.display());
            return RegistryAuth::Anonymous;
        }
    };
    use docker_credential::{CredentialRetrievalError as E, DockerCredential as C};
    match docker_credential::get_credential_from_reader(&bytes[..], registry) {
        Ok(C::UsernamePassword(u, p)) => RegistryAuth::Basic(u, p),
        Ok(C::IdentityToken(t)) => RegistryAuth::Bearer(t),
        Err(E::NoCredentialConfigured) => RegistryAuth::Anonymous,
        Err(e) => {
            tracing::warn!(
                "Docker config {} for {}: {e}; trying anonymously",
                config.display(),
                registry
            );
            RegistryAuth::Anonymous
        }
    }
}

fn oci_reference(r: &OciRef) -> Reference {
    match (&r.tag, &r.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(r.registry.clone(), r.repository.clone(), tag.clone(), digest.clone())
        }
        (None, Some(digest)) => Reference::with_digest(r.registry.clone(), r.repository.clone(), digest.clone()),
        (tag, None) => Reference::with_tag(
            r.registry.clone(),
            r.repository.clone(),
            tag.clone().unwrap_or_else(|| "latest".into()),
        ),
    }
}

/// Why msrwasm refused what a registry (or its token service) pointed it
/// to or answered: the `source` of [`OciError::Registry`].
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A URL the registry handed out that the transport rule forbids
    /// (`transport_ok`): nothing was sent there.
    #[error(
        "{what} {url} refused: plain HTTP is spoken only to loopback hosts, and only for a registry on loopback; nothing was sent there"
    )]
    PlainHttp {
        /// `the token realm`, `a redirect to`, `the upload location`.
        what: &'static str,
        /// The URL.
        url: String,
    },
    /// A URL the registry handed out that does not parse, or is missing.
    #[error("{what} `{url}`: {reason}")]
    BadUrl {
        /// `the token realm`, `the upload location`.
        what: &'static str,
        /// The text given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A request redirected more than `MAX_REDIRECTS` (10) times.
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    /// The token service refused the credentials (or anonymous access).
    #[error("the token service {realm} answered {status}: {message}")]
    TokenRefused {
        /// The realm (without the query).
        realm: String,
        /// The HTTP status.
        status: u16,
        /// The first KiB of its answer.
        message: String,
    },
    /// The token service's answer holds no usable token.
    #[error("the token service {realm} answered no usable token: {reason}")]
    NoToken {
        /// The realm (without the query).
        realm: String,
        /// What is wrong.
        reason: String,
    },
}

/// Whether a URL a registry handed out (token realm, redirect, upload
/// location) may be used: HTTPS to any host (a token realm or a CDN on
/// another host is normal), or plain HTTP to a loopback host when the
/// registry itself is on loopback. "Loopback" is by the URL's text alone
/// ([`super::is_loopback_host`]), never by what a name resolves to.
fn transport_ok(url: &Url, registry_loopback: bool) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => registry_loopback && url.host_str().is_some_and(super::is_loopback_host),
        _ => false,
    }
}

/// The `realm` and `service` of the first `Bearer` challenge of a
/// `WWW-Authenticate` value: `SCHEME name=value, name="quoted value", ...`,
/// several challenges separated by commas (RFC 9110, 11.6.1).
fn bearer_challenge(value: &str) -> Option<(String, Option<String>)> {
    let b = value.as_bytes();
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let skip = |mut i: usize, also_comma: bool| {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t' || (also_comma && b[i] == b',')) {
            i += 1;
        }
        i
    };
    let (mut bearer, mut realm, mut service) = (false, None, None);
    let mut i = 0;
    loop {
        i = skip(i, true);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && tchar(b[i]) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let name = &value[start..i];
        let after = skip(i, false);
        if after < b.len() && b[after] == b'=' {
            // A parameter of the current challenge.
            i = skip(after + 1, false);
            let mut v = Vec::new();
            if i < b.len() && b[i] == b'"' {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if i + 1 < b.len() => {
                            v.push(b[i + 1]);
                            i += 2;
                        }
                        Some(&c) => {
                            v.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while i < b.len() && !b" \t,".contains(&b[i]) {
                    v.push(b[i]);
                    i += 1;
                }
            }
            let v = String::from_utf8_lossy(&v).into_owned();
            if bearer && name.eq_ignore_ascii_case("realm") {
                realm = Some(v);
            } else if bearer && name.eq_ignore_ascii_case("service") {
                service = Some(v);
            }
        } else {
            // The next challenge's scheme.
            if bearer && realm.is_some() {
                break;
            }
            bearer = name.eq_ignore_ascii_case("bearer");
            (realm, service) = (None, None);
            i = after;
        }
    }
    Some((realm.filter(|_| bearer)?, service))
}

/// Up to `limit` bytes of a response's body, and whether there was more.
async fn read_limited(response: &mut reqwest::Response, limit: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// What a session may do: the token scope asked for.
#[derive(Clone, Copy)]
enum Scope {
    Pull,
    Push,
}

/// One push or pull's way to a registry: its client, and the credentials
/// for requests to the registry itself.
struct Session<'a> {
    r: &'a OciRef,
    /// `http://HOST[:PORT]/` or `https://HOST[:PORT]/`.
    base: Url,
    repository: String,
    http: reqwest::Client,
    /// Basic credentials, a token, or nothing: sent to `base`'s origin only.
    auth: RegistryAuth,
}

impl<'a> Session<'a> {
    /// Asks the registry (without credentials) how it wants them; for a
    /// `Bearer` challenge, gets a token from the realm it names, if
    /// [`transport_ok`] allows that realm: a refused realm is an error, and
    /// nothing is sent there.
    async fn open(store: &OciStore, r: &'a OciRef, auth: &RegistryAuth, scope: Scope) -> Result<Self, OciError> {
        let reference = oci_reference(r);
        let scheme = if r.is_loopback() { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", reference.resolve_registry()))
            .map_err(|e| OciError::Config(format!("{r}: the registry `{}` is not a host: {e}", r.registry)))?;
        let mut session = Self {
            r,
            base,
            repository: reference.repository().to_owned(),
            http: store.http(r)?,
            auth: auth.clone(),
        };
        // An identity token from the Docker config goes to the registry as
        // it is (as oci-client did).
        if matches!(auth, RegistryAuth::Bearer(_)) {
            return Ok(session);
        }
        let probe = session
            .http
            .get(session.url("v2/"))
            .send()
            .await
            .map_err(session.failed())?;
        let challenge = match probe.status() {
            StatusCode::UNAUTHORIZED => probe
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(bearer_challenge),
            _ => None,
        };
        drop(probe);
        if let Some((realm, service)) = challenge {
            let token = session.token(&realm, service.as_deref(), scope).await?;
            session.auth = RegistryAuth::Bearer(token);
        }
        Ok(session)
    }

    /// A token from `realm` for this repository, sending the session's
    /// (Basic) credentials there: only over HTTPS, or plain HTTP to a
    /// loopback realm of a loopback registry ([`transport_ok`]).
    async fn token(&self, realm: &str, service: Option<&str>, scope: Scope) -> Result<String, OciError> {
        let refuse = |e: TransportError| OciError::Registry {
            reference: self.r.to_string(),
            source: Box::new(e),
        };
        let mut url = Url::parse(realm).map_err(|e| {
            refuse(TransportError::BadUrl {
                what: "the token realm",
                url: realm.chars().take(300).collect(),
                reason: e.to_string(),
            })
        })?;
        if !transport_ok(&url, self.r.is_loopback()) {
            return Err(refuse(TransportError::PlainHttp {
                what: "the token realm",
                url: url.to_string(),
            }));
        }
        let actions = match scope {
            Scope::Pull => "pull",
            Scope::Push => "pull,push",
        };
        url.query_pairs_mut()
            .append_pair("scope", &format!("repository:{}:{actions}", self.repository));
        if let Some(service) = service {
            url.query_pairs_mut().append_pair("service", service);
        }
        let mut request = self.http.get(url);
        if let RegistryAuth::Basic(user, password) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let mut response = request.send().await.map_err(self.failed())?;
        let status = response.status();
        let (body, cut) = read_limited(&mut response, MAX_TOKEN_BYTES)
            .await
            .map_err(self.failed())?;
        if !status.is_success() {
            return Err(refuse(TransportError::TokenRefused {
                realm: realm.chars().take(300).collect(),
                status: status.as_u16(),
                message: crate::plugin::sanitize(&String::from_utf8_lossy(&body[..body.len().min(1024)])),
            }));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let no_token = |reason: String| {
            refuse(TransportError::NoToken {
                realm: realm.chars().take(300).collect(),
                reason,
            })
        };
        if cut {
            return Err(no_token(format!("an answer of more than {MAX_TOKEN_BYTES} bytes")));
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| no_token(e.to_string()))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| no_token("neither `token` nor `access_token`".into()))?;
        if header::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(no_token("the token is not a header value".into()));
        }
        Ok(token)
    }

    /// `path` (`v2/...`) at the registry.
    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("a path under the registry's URL")
    }

    /// A request to `url`, with the credentials if `url` is the registry's
    /// own origin (scheme, host and port): an upload location elsewhere (a
    /// storage service's signed URL) gets none.
    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let own = url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default();
        let request = self.http.request(method, url);
        match (&self.auth, own) {
            (RegistryAuth::Basic(user, password), true) => request.basic_auth(user, Some(password)),
            (RegistryAuth::Bearer(token), true) => request.bearer_auth(token),
            _ => request,
        }
    }

    fn failed(&self) -> impl Fn(reqwest::Error) -> OciError + '_ {
        move |e| OciError::Registry {
            reference: self.r.to_string(),
            source: Box::new(e),
        }
    }

    /// The registry's refusal, with the first KiB of its answer.
    async fn refused(&self, mut response: reqwest::Response) -> OciError {
        use oci_client::errors::OciDistributionError as E;
        let status = response.status();
        let url = response.url().to_string();
        let (body, _) = read_limited(&mut response, 1024).await.unwrap_or_default();
        let error = match status {
            StatusCode::UNAUTHORIZED => E::UnauthorizedError { url },
            status => match serde_json::from_slice(&body) {
                Ok(envelope) if status.is_client_error() => E::RegistryError { envelope, url },
                _ => E::ServerError {
                    code: status.as_u16(),
                    url,
                    message: crate::plugin::sanitize(&String::from_utf8_lossy(&body)),
                },
            },
        };
        OciError::Registry {
            reference: self.r.to_string(),
            source: Box::new(error),
        }
    }

    /// GETs the manifest and the registry's digest header for it, never
    /// holding more than [`MAX_MANIFEST_BYTES`].
    async fn manifest(&self) -> Result<(Vec<u8>, Option<String>), OciError> {
        let r = self.r;
        let name = r.digest.as_deref().or(r.tag.as_deref()).unwrap_or("latest");
        let url = self.url(&format!("v2/{}/manifests/{name}", self.repository));
        let mut response = self
            .request(Method::GET, url)
            .header(
                header::ACCEPT,
                format!("{MANIFEST_MEDIA_TYPE}, {DOCKER_MANIFEST_MEDIA_TYPE}"),
            )
            .send()
            .await
            .map_err(self.failed())?;
        if response.status() != StatusCode::OK {
            return Err(self.refused(response).await);
        }
        let too_big = |what: String| OciError::NotWasm {
            reference: r.to_string(),
            reason: format!("{what} is not a wasm artifact's (the limit is {MAX_MANIFEST_BYTES} bytes)"),
        };
        if let Some(n) = response.content_length()
            && n > MAX_MANIFEST_BYTES
        {
            return Err(too_big(format!("a {n}-byte manifest")));
        }
        let header = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (body, cut) = read_limited(&mut response, MAX_MANIFEST_BYTES as usize)
            .await
            .map_err(self.failed())?;
        if cut {
            return Err(too_big(format!("a manifest of more than {MAX_MANIFEST_BYTES} bytes")));
        }
        Ok((body, header))
    }

    /// GETs the layer, never holding more than the manifest gives it
    /// (checked against its digest by the caller).
    async fn blob(&self, layer: &OciDescriptor) -> Result<Vec<u8>, OciError> {
        let r = self.r;
        let size = layer.size as u64;
        let url = self.url(&format!("v2/{}/blobs/{}", self.repository, layer.digest));
        let mut response = self.request(Method::GET, url).send().await.map_err(self.failed())?;
        if !response.status().is_success() {
            return Err(self.refused(response).await);
        }
        let too_big = |reason: String| OciError::NotWasm {
            reference: r.to_string(),
            reason,
        };
        if let Some(n) = response.content_length()
            && n > size
        {
            return Err(too_big(format!(
                "the registry sends a {n}-byte layer the manifest says is {size} bytes"
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = response.chunk().await.map_err(self.failed())? {
            if (bytes.len() + chunk.len()) as u64 > size {
                return Err(too_big(format!(
                    "the registry sends more than the {size} bytes the manifest gives the layer"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Uploads a blob the registry does not have yet, in one request (POST
    /// for an upload location, then PUT there).
    async fn push_blob(&self, data: Vec<u8>, digest: &str) -> Result<(), OciError> {
        let url = self.url(&format!("v2/{}/blobs/{digest}", self.repository));
        let known = self.request(Method::HEAD, url).send().await.map_err(self.failed())?;
        if known.status().is_success() {
            return Ok(());
        }
        let url = self.url(&format!("v2/{}/blobs/uploads/", self.repository));
        let started = self
            .request(Method::POST, url)
            .body(Vec::new())
            .send()
            .await
            .map_err(self.failed())?;
        if started.status() != StatusCode::ACCEPTED {
            return Err(self.refused(started).await);
        }
        let bad = |url: String, reason: String| OciError::Registry {
            reference: self.r.to_string(),
            source: Box::new(TransportError::BadUrl {
                what: "the upload location",
                url,
                reason,
            }),
        };
        let location = started
            .headers()
            .get(header::LOCATION)
            .ok_or_else(|| bad(String::new(), "missing".into()))?
            .to_str()
            .map_err(|e| bad(String::new(), e.to_string()))?;
        let mut url = started
            .url()
            .join(location)
            .map_err(|e| bad(location.chars().take(300).collect(), e.to_string()))?;
        if !transport_ok(&url, self.r.is_loopback()) {
            return Err(OciError::Registry {
                reference: self.r.to_string(),
                source: Box::new(TransportError::PlainHttp {
                    what: "the upload location",
                    url: url.to_string(),
                }),
            });
        }
        url.query_pairs_mut().append_pair("digest", digest);
        self.put(url, "application/octet-stream", data).await
    }

    /// PUTs the manifest under `tag`.
    async fn push_manifest(&self, body: Vec<u8>, tag: &str) -> Result<(), OciError> {
        let url = self.url(&format!("v2/{}/manifests/{tag}", self.repository));
        self.put(url, MANIFEST_MEDIA_TYPE, body).await
    }

    /// PUTs `body` of `content_type` to `url`; the registry must accept it.
    async fn put(&self, url: Url, content_type: &'static str, body: Vec<u8>) -> Result<(), OciError> {
        let done = self
            .request(Method::PUT, url)
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(self.failed())?;
        match done.status().is_success() {
            true => Ok(()),
            false => Err(self.refused(done).await),
        }
    }
}

/// The credentials each registry's lookup found, shared by the pulls of
/// one [`Fetch::fetch_all`]: the Docker credential helper runs once per
/// registry, not once per plugin (a second lookup while one runs would
/// fail at once, see `OciStore::auth`).
#[derive(Default)]
struct Logins(Mutex<HashMap<String, Arc<OnceLock<Option<RegistryAuth>>>>>);

impl Logins {
    fn get(&self, store: &OciStore, r: &OciRef, until: Instant) -> Result<RegistryAuth, OciError> {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(r.registry.clone())
            .or_default()
            .clone();
        match slot.get_or_init(|| store.auth(r, until).ok()) {
            Some(auth) => Ok(auth.clone()),
            // The lookup failed: this reference's own error.
            None => store.auth(r, until),
        }
    }
}

impl Fetch for OciStore {
    fn fetch(&self, source: &OciSource) -> Result<Fetched, OciError> {
        self.fetch_until(source, Instant::now() + self.options.deadline, &Logins::default())
    }

    fn poll(&self, source: &OciSource) -> Result<bool, OciError> {
        let pulled = self.pull(&source.reference)?;
        let changed = self.follow(&source.reference, &pulled)?;
        if changed {
            tracing::info!(reference = %source.reference, digest = %pulled.manifest_digest, "tag moved");
        }
        Ok(changed)
    }

    /// Every source at once ([`super::MAX_PARALLEL_FETCHES`] at a time),
    /// all by one deadline: registries that never answer cost the load one
    /// deadline, however many plugins they hold up; a pull that would start
    /// after it fails at once (a cached plugin is still used).
    fn fetch_all(&self, sources: &[OciSource]) -> Vec<Result<Fetched, OciError>> {
        let until = Instant::now() + self.options.deadline;
        let logins = Logins::default();
        super::in_parallel(sources.len(), |i| self.fetch_until(&sources[i], until, &logins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_read_from_www_authenticate() {
        for (value, expected) in [
            (
                r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull""#,
                Some(("https://ghcr.io/token", Some("ghcr.io"))),
            ),
            (
                r#"Basic realm="registry", Bearer realm="https://auth.example/t?x=1", service=reg"#,
                Some(("https://auth.example/t?x=1", Some("reg"))),
            ),
            (r#"bearer REALM="http://a\"b/t""#, Some((r#"http://a"b/t"#, None))),
            (
                r#"Bearer service="s", Basic realm="http://evil/""#,
                None, // a Bearer challenge without its realm
            ),
            (r#"Basic realm="registry""#, None),
            (r#"Bearer realm="unterminated"#, None),
            ("", None),
        ] {
            let got = bearer_challenge(value);
            assert_eq!(
                got.as_ref().map(|(r, s)| (r.as_str(), s.as_deref())),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn only_https_or_loopback_http_from_a_loopback_registry_is_used() {
        for (url, registry_loopback, ok) in [
            ("https://auth.example/token", false, true),
            ("https://auth.example/token", true, true),
            ("https://cdn.example/blob", false, true),
            ("http://127.0.0.1:5000/token", true, true),
            ("http://127.9.9.9/token", true, true),
            ("http://[::1]:5000/token", true, true),
            ("http://localhost/token", true, true),
            // A remote registry is followed to HTTPS only, loopback included.
            ("http://127.0.0.1:5000/token", false, false),
            // Plain HTTP off loopback, even from a loopback registry; a name
            // that resolves to a loopback address is no loopback host.
            ("http://auth.example/token", true, false),
            ("http://localhost.localdomain/token", true, false),
            ("http://192.0.2.1/token", true, false),
            ("ftp://127.0.0.1/token", true, false),
        ] {
            assert_eq!(
                transport_ok(&Url::parse(url).unwrap(), registry_loopback),
                ok,
                "{url} from a {}loopback registry",
                if registry_loopback { "" } else { "non-" }
            );
        }
    }
}
