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
//! `MSRWASM_REGISTRY_CA`; plain HTTP only to loopback registries.
//! Credentials: `MSRWASM_REGISTRY_USER`/`MSRWASM_REGISTRY_PASSWORD`, else the
//! Docker config file (`$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`, credential helpers included), else anonymous.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

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

/// How the store reaches registries.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// PEM certificates trusted besides the system roots.
    pub ca: Option<PathBuf>,
    /// User and password for every registry (else the Docker config).
    pub credentials: Option<(String, String)>,
    /// Longest one push or pull may take, all requests included.
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
    extra_roots: Vec<Certificate>,
    /// The same roots, for the manifest GET (see [`OciStore::pull_manifest`]).
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
        let (extra_roots, http_roots) = match &options.ca {
            Some(path) => {
                let pem = crate::files::read_regular(path, MAX_CONFIG_BYTES)
                    .map_err(|e| OciError::Config(format!("MSRWASM_REGISTRY_CA {}: {e}", path.display())))?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(OciError::Config(format!(
                        "MSRWASM_REGISTRY_CA {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                let http_roots = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| OciError::Config(format!("MSRWASM_REGISTRY_CA {}: {e}", path.display())))?;
                let roots = vec![Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem,
                }];
                (roots, http_roots)
            }
            None => (Vec::new(), Vec::new()),
        };
        Ok(Self {
            dir,
            options,
            extra_roots,
            http_roots,
            verified: Mutex::new(HashMap::new()),
            lookups: Arc::default(),
        })
    }

    /// The cache directory (`.../oci`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn client(&self, r: &OciRef) -> Client {
        Client::new(ClientConfig {
            protocol: match r.is_loopback() {
                true => ClientProtocol::HttpsExcept(vec![r.registry.clone()]),
                false => ClientProtocol::Https,
            },
            extra_root_certificates: self.extra_roots.clone(),
            connect_timeout: Some(self.options.connect_timeout),
            read_timeout: Some(self.options.read_timeout),
            // Only single-platform manifests are wasm artifacts.
            platform_resolver: None,
            max_concurrent_download: 1,
            max_concurrent_upload: 2,
            user_agent: concat!("msrwasm/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
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

    fn registry_error(r: &OciRef) -> impl Fn(oci_client::errors::OciDistributionError) -> OciError + '_ {
        move |e| OciError::Registry {
            reference: r.to_string(),
            source: Box::new(e),
        }
    }

    /// Pushes `bytes` (a wasm module or component) to `r` as a Wasm OCI
    /// artifact with `annotations`.
    pub fn push(&self, bytes: &[u8], annotations: BTreeMap<String, String>, r: &OciRef) -> Result<Pushed, OciError> {
        if r.digest.is_some() {
            return Err(OciError::Config(format!("{r}: push to a tag, not a digest")));
        }
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
        let reference = oci_reference(r);
        let client = self.client(r);
        // One deadline for the whole push, credentials included.
        let until = Instant::now() + self.options.deadline;
        let auth = self.auth(r, until)?;
        let err = Self::registry_error(r);
        self.block(r, until, async {
            client
                .auth(&reference, &auth, RegistryOperation::Push)
                .await
                .map_err(&err)?;
            client
                .push_blob(&reference, config.clone(), &config_digest)
                .await
                .map_err(&err)?;
            client
                .push_blob(&reference, bytes.to_vec(), &layer_digest)
                .await
                .map_err(&err)?;
            client
                .push_manifest_raw(
                    &reference,
                    body.clone(),
                    http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
                )
                .await
                .map_err(&err)?;
            Ok(())
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
        let reference = oci_reference(r);
        let client = self.client(r);
        // One deadline for the whole pull: credentials, manifest and layer.
        let until = Instant::now() + self.options.deadline;
        let auth = self.auth(r, until)?;
        let err = Self::registry_error(r);
        let (body, header_digest) = self.block(r, until, self.pull_manifest(r, &client, &reference, &auth))?;
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
            let size = layer.size as u64;
            let bytes = self.block(r, until, async {
                let mut stream = client.pull_blob_stream(&reference, &layer).await.map_err(&err)?;
                if stream.content_length.is_some_and(|n| n > size) {
                    return Err(OciError::NotWasm {
                        reference: r.to_string(),
                        reason: format!(
                            "the registry sends a {}-byte layer the manifest says is {size} bytes",
                            stream.content_length.unwrap_or(0)
                        ),
                    });
                }
                let mut bytes = Vec::with_capacity(size as usize);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| {
                        // The client's own check of the layer digest.
                        use oci_client::errors::DigestError;
                        match e.get_ref().and_then(|i| i.downcast_ref::<DigestError>()) {
                            Some(DigestError::VerificationError { expected, actual }) => OciError::Digest {
                                reference: r.to_string(),
                                what: format!("the wasm layer ({} of {size} bytes received)", bytes.len()),
                                expected: expected.clone(),
                                actual: actual.clone(),
                            },
                            _ => OciError::Registry {
                                reference: r.to_string(),
                                source: Box::new(e),
                            },
                        }
                    })?;
                    if (bytes.len() + chunk.len()) as u64 > size {
                        return Err(OciError::NotWasm {
                            reference: r.to_string(),
                            reason: format!(
                                "the registry sends more than the {size} bytes the manifest gives the layer"
                            ),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(bytes)
            })?;
            let actual = digest_of(&bytes);
            if actual != layer.digest {
                return Err(OciError::Digest {
                    reference: r.to_string(),
                    what: format!("the wasm layer ({} of {size} bytes received)", bytes.len()),
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
    }

    /// GETs `r`'s manifest and the registry's digest header for it, never
    /// holding more than [`MAX_MANIFEST_BYTES`]: oci-client's own manifest
    /// pull reads a body of any size into memory, so a hostile registry
    /// could fill it within the deadline. oci-client still does the
    /// authentication (its token handshake), on the same settings.
    async fn pull_manifest(
        &self,
        r: &OciRef,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let registry = reference.resolve_registry();
        // An auth failure is the manifest GET's 401 to report, as it is
        // for oci-client's own pulls.
        let bearer = client
            .auth(reference, auth, RegistryOperation::Pull)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!("{r}: registry authentication: {e}; trying anonymously");
                None
            });
        let http = reqwest::Client::builder()
            .tls_certs_merge(self.http_roots.iter().cloned())
            .https_only(!r.is_loopback())
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.read_timeout)
            .user_agent(concat!("msrwasm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Config(format!("{r}: HTTP client: {e}")))?;
        let url = format!(
            "{}://{registry}/v2/{}/manifests/{}",
            if r.is_loopback() { "http" } else { "https" },
            reference.repository(),
            reference.digest().or(reference.tag()).unwrap_or("latest"),
        );
        let mut request = http.get(&url).header(
            reqwest::header::ACCEPT,
            format!("{MANIFEST_MEDIA_TYPE}, {DOCKER_MANIFEST_MEDIA_TYPE}"),
        );
        request = match (bearer, auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let failed = |e: reqwest::Error| OciError::Registry {
            reference: r.to_string(),
            source: Box::new(e),
        };
        let mut response = request.send().await.map_err(failed)?;
        let status = response.status();
        let too_big = |what: String| OciError::NotWasm {
            reference: r.to_string(),
            reason: format!("{what} is not a wasm artifact's (the limit is {MAX_MANIFEST_BYTES} bytes)"),
        };
        if status.is_success()
            && let Some(n) = response.content_length()
            && n > MAX_MANIFEST_BYTES
        {
            return Err(too_big(format!("a {n}-byte manifest")));
        }
        let header = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // An error's body is only a message: the first KiB of it will do.
        let limit = if status.is_success() { MAX_MANIFEST_BYTES } else { 1024 } as usize;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > limit {
                if status.is_success() {
                    return Err(too_big(format!("a manifest of more than {limit} bytes")));
                }
                body.extend_from_slice(&chunk[..limit - body.len()]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        use oci_client::errors::OciDistributionError as E;
        let error = match status {
            reqwest::StatusCode::OK => return Ok((body, header)),
            reqwest::StatusCode::UNAUTHORIZED => E::UnauthorizedError { url },
            status => match serde_json::from_slice(&body) {
                Ok(envelope) if status.is_client_error() => E::RegistryError { envelope, url },
                _ => E::ServerError {
                    code: status.as_u16(),
                    url,
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            },
        };
        Err(OciError::Registry {
            reference: r.to_string(),
            source: Box::new(error),
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

impl Fetch for OciStore {
    fn fetch(&self, source: &OciSource) -> Result<Fetched, OciError> {
        let r = &source.reference;
        if !source.follows() {
            let pulled = match self.cached(r) {
                Some(p) => p,
                None => self.pull(r)?,
            };
            tracing::info!(reference = %r, digest = %pulled.manifest_digest, "OCI plugin ready");
            return Ok(Fetched {
                path: pulled.blob.clone(),
                sha256: Some(pulled.sha256().to_owned()),
            });
        }
        let pulled = match self.pull(r) {
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

    fn poll(&self, source: &OciSource) -> Result<bool, OciError> {
        let pulled = self.pull(&source.reference)?;
        let changed = self.follow(&source.reference, &pulled)?;
        if changed {
            tracing::info!(reference = %source.reference, digest = %pulled.manifest_digest, "tag moved");
        }
        Ok(changed)
    }
}
