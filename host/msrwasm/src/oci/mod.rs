//! Plugins in OCI registries: `oci://` references, pull policies, the
//! [`Fetch`] seam the engine resolves references through, and the
//! [`Follower`] that rolls a moved tag out to a running VM.
//!
//! The registry client itself ([`store::OciStore`]: push, pull, the
//! content-addressed cache, credentials, TLS) sits behind the `oci` feature;
//! everything here is plain code, so an engine built without it still
//! parses manifests that name `oci://` plugins and says what is missing.
//!
//! A reference is `oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`:
//! `@sha256:` pins the OCI manifest, a manifest's `sha256` key still pins
//! the wasm bytes, and any mismatch refuses the plugin. See `docs/oci.md`.

mod follow;
#[cfg(feature = "oci")]
pub mod store;

pub use follow::{Follower, FollowerThread};

use std::fmt;
use std::path::PathBuf;

/// The hex of a `sha256:<64 lowercase hex>` digest, if it is one.
pub(crate) fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The scheme prefix of a plugin path that names a registry artifact.
pub(crate) const SCHEME: &str = "oci://";

/// Default seconds between re-resolving a followed tag.
pub(crate) const DEFAULT_POLL_S: u64 = 30;
/// Longest `poll_s` a manifest may set (a day).
pub(crate) const MAX_POLL_S: u64 = 86_400;

pub(crate) use local::is_reference;

/// Whether `host` (a name or an address, IPv6 with or without brackets) is
/// this host by its text alone: `localhost`, `127.0.0.0/8` or `::1`. A name
/// that merely resolves to a loopback address is not: the decision never
/// depends on a resolver.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A parsed `oci://` reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OciRef {
    /// `HOST[:PORT]`.
    pub registry: String,
    /// `team/plugins/rapl`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`: pins the OCI manifest.
    pub digest: Option<String>,
}

/// A reference that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid OCI reference `{reference}`: {reason}")]
pub struct RefError {
    /// The text given.
    pub reference: String,
    /// What is wrong.
    pub reason: String,
}

impl OciRef {
    /// Parses `oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`.
    pub fn parse(text: &str) -> Result<Self, RefError> {
        let bad = |reason: &str| RefError {
            reference: text.chars().take(300).collect(),
            reason: reason.to_owned(),
        };
        if text.len() > 1024 {
            return Err(bad("longer than 1024 characters"));
        }
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("expected oci://HOST/REPOSITORY[:TAG][@sha256:DIGEST]"))?;
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:") {
                    return Err(bad("the digest must be sha256:<64 hex digits>"));
                }
                if sha256_hex(d).is_none() {
                    return Err(bad("the digest must be sha256:<64 lowercase hex digits>"));
                }
                (r, Some(d.to_owned()))
            }
            None => (rest, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry host"))?;
        let host_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !host_ok {
            return Err(bad("the registry must be HOST or HOST:PORT"));
        }
        // A tag follows the last `:` after the last `/`.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => (&path[..last_slash + i], Some(&path[last_slash + i + 1..])),
            None => (path, None),
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        if repository.len() > 255 || !repository.split('/').all(component_ok) {
            return Err(bad(
                "the repository must be lowercase path components of letters, digits, `.`, `_` and `-`",
            ));
        }
        if let Some(tag) = tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !tag.starts_with(['.', '-']);
            if !ok {
                return Err(bad("a tag is 1-128 letters, digits, `.`, `_` and `-`"));
            }
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// The host without the port.
    pub fn host(&self) -> &str {
        let r = self.registry.as_str();
        if let Some(end) = r.strip_prefix('[').and_then(|s| s.find(']')) {
            return &r[1..=end];
        }
        r.rsplit_once(':').map_or(r, |(h, _)| h)
    }

    /// Whether the registry is on this host (127.0.0.0/8, ::1, localhost):
    /// the only registries spoken to over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host())
    }

    /// The last path component of the repository (`rapl` of `team/rapl`):
    /// the plugin's default name.
    pub fn name(&self) -> &str {
        self.repository.rsplit('/').next().unwrap_or(&self.repository)
    }

    /// The same reference pinned to `digest`, without its tag.
    pub fn pinned(&self, digest: &str) -> Self {
        Self {
            tag: None,
            digest: Some(digest.to_owned()),
            ..self.clone()
        }
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// When a reference is fetched from the registry (`pull_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Start from the local cache when the content is there (the default).
    #[default]
    IfNotPresent,
    /// Resolve the tag at start and every `poll_s` seconds; a new digest
    /// goes through hot reload on the running VM.
    Always,
}

/// A plugin's registry source: what the manifest's `path`, `pull_policy`
/// and `poll_s` say.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OciSource {
    /// The reference.
    pub reference: OciRef,
    /// When to fetch.
    pub pull_policy: PullPolicy,
    /// Seconds between re-resolving the tag (`pull_policy = "always"`).
    pub poll_s: u64,
}

impl OciSource {
    /// `reference` with the default policy.
    pub fn new(reference: OciRef) -> Self {
        Self {
            reference,
            pull_policy: PullPolicy::IfNotPresent,
            poll_s: DEFAULT_POLL_S,
        }
    }

    /// Whether the VM follows the tag (re-resolves it while running). A
    /// digest-pinned reference cannot move, so it is never followed.
    pub fn follows(&self) -> bool {
        self.pull_policy == PullPolicy::Always && self.reference.digest.is_none()
    }
}

/// A reference made local.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The file the engine loads.
    pub path: PathBuf,
    /// The sha256 (hex) its bytes must have, when the content is fixed
    /// (everything but a followed tag).
    pub sha256: Option<String>,
}

/// Why a reference was not fetched.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Not a valid reference.
    #[error(transparent)]
    Reference(#[from] RefError),
    /// The engine has no way to fetch (built without the `oci` feature,
    /// or the VMM gave it no store).
    #[error("{0}: this engine has no OCI store (msrwasm built without the `oci` feature, or the VMM did not give one)")]
    NoStore(String),
    /// The registry refused or could not be reached.
    #[error("{reference}: registry")]
    Registry {
        /// The reference.
        reference: String,
        /// What the client reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry (or the Docker credential helper for it) took longer
    /// than the deadline.
    #[error("{reference}: {what} did not answer within {seconds} s")]
    Timeout {
        /// The reference.
        reference: String,
        /// `the registry`, `the Docker credential helper`.
        what: &'static str,
        /// The deadline.
        seconds: u64,
    },
    /// Content whose digest is not what was asked for.
    #[error("{reference}: {what} has digest {actual}, expected {expected}; refused")]
    Digest {
        /// The reference.
        reference: String,
        /// `the manifest`, `the wasm layer`, `the wasm layer (plugin.sha256)`.
        what: String,
        /// What it should be.
        expected: String,
        /// What it is.
        actual: String,
    },
    /// The artifact is not a wasm plugin (or not one we can read).
    #[error("{reference}: {reason}")]
    NotWasm {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// Not in the cache and the registry is unreachable.
    #[error("{reference}: not in the local cache, and the registry failed: {source}")]
    Unavailable {
        /// The reference.
        reference: String,
        /// Why the registry failed.
        #[source]
        source: Box<OciError>,
    },
    /// The local cache or an output file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Settings (CA file, credentials) unusable.
    #[error("{0}")]
    Config(String),
}

/// How the engine makes `oci://` plugins local: implemented by
/// [`store::OciStore`] (feature `oci`), or by a VMM's own registry client.
pub trait Fetch: Send + Sync {
    /// Makes `source` local (from the cache or the registry, as its pull
    /// policy says). For a followed tag, the returned file is the one that
    /// [`Fetch::poll`] later replaces.
    fn fetch(&self, source: &OciSource) -> Result<Fetched, OciError>;

    /// Re-resolves a followed tag now; when it moved, replaces the file
    /// [`Fetch::fetch`] returned with the new (digest-verified) content.
    /// Returns whether the file changed.
    fn poll(&self, source: &OciSource) -> Result<bool, OciError>;

    /// Makes every one of `sources` local, as [`Fetch::fetch`] does each;
    /// the results are in the order of `sources`. The engine fetches all the
    /// `oci://` plugins of one policy through this, so that registries that
    /// do not answer cost one deadline, not one each. This default runs
    /// [`Fetch::fetch`] on up to [`MAX_PARALLEL_FETCHES`] threads at once;
    /// [`store::OciStore`] also puts them all under one deadline.
    fn fetch_all(&self, sources: &[OciSource]) -> Vec<Result<Fetched, OciError>> {
        in_parallel(sources.len(), |i| self.fetch(&sources[i]))
    }
}

/// Most references [`Fetch::fetch_all`] fetches at once: as many as a
/// policy has plugins, so that plugins on a silent registry never hold up
/// (and, under one deadline, never fail) plugins on a healthy one.
pub const MAX_PARALLEL_FETCHES: usize = crate::policy::manifest::MAX_PLUGINS;

/// `work(i)` for every `i` in `0..n`, on up to [`MAX_PARALLEL_FETCHES`]
/// threads (this one included); the results in the order of `i`.
pub(crate) fn in_parallel<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if n <= 1 {
        return (0..n).map(work).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let drain = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let result = work(i);
            *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..n.min(MAX_PARALLEL_FETCHES) {
            // A thread that cannot be started leaves its share to the others.
            if std::thread::Builder::new()
                .name("msrwasm-fetch".into())
                .spawn_scoped(s, drain)
                .is_err()
            {
                break;
            }
        }
        drain();
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every index was taken by a thread that finished")
        })
        .collect()
}

/// Makes the `oci://` plugins of `plugins` local through `fetch`, all in
/// one [`Fetch::fetch_all`]: each one's `path` becomes the fetched file, and
/// fixed content is pinned by sha256 (a manifest `sha256` that disagrees
/// with the registry's layer is refused here). Plugins that are files, or
/// already fetched, are left alone. Returns the plugins that failed, by
/// name, in their order.
pub(crate) fn localize_all(
    fetch: Option<&dyn Fetch>,
    plugins: &mut [crate::PluginSettings],
) -> Vec<(String, OciError)> {
    let wanted: Vec<(usize, OciSource)> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_unfetched())
        .filter_map(|(i, p)| Some((i, p.source.clone()?)))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Some(fetch) = fetch else {
        return wanted
            .into_iter()
            .map(|(i, s)| (plugins[i].name.clone(), OciError::NoStore(s.reference.to_string())))
            .collect();
    };
    let sources: Vec<OciSource> = wanted.iter().map(|(_, s)| s.clone()).collect();
    let mut results = fetch.fetch_all(&sources).into_iter();
    let mut errors = Vec::new();
    for (i, source) in wanted {
        let settings = &mut plugins[i];
        let result = results.next().unwrap_or_else(|| {
            Err(OciError::Config(format!(
                "{}: the OCI fetcher returned no result for it",
                source.reference
            )))
        });
        let fetched = match result {
            Ok(f) => f,
            Err(e) => {
                errors.push((settings.name.clone(), e));
                continue;
            }
        };
        if let (Some(pin), Some(actual)) = (&settings.sha256, &fetched.sha256)
            && !pin.eq_ignore_ascii_case(actual)
        {
            let e = OciError::Digest {
                reference: source.reference.to_string(),
                what: "the wasm layer (against plugin.sha256)".into(),
                expected: format!("sha256:{pin}"),
                actual: format!("sha256:{actual}"),
            };
            errors.push((settings.name.clone(), e));
            continue;
        }
        settings.path = fetched.path;
        if settings.sha256.is_none() {
            settings.sha256 = fetched.sha256;
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print_back() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (text, registry, repo, tag, digest) in [
            (
                "oci://127.0.0.1:5000/team/rapl:1.2",
                "127.0.0.1:5000",
                "team/rapl",
                Some("1.2"),
                None,
            ),
            ("oci://ghcr.io/acme/rapl", "ghcr.io", "acme/rapl", Some("latest"), None),
            (
                &format!("oci://localhost/rapl@{d}")[..],
                "localhost",
                "rapl",
                None,
                Some(&d[..]),
            ),
            (
                &format!("oci://[::1]:5000/rapl:v1@{d}")[..],
                "[::1]:5000",
                "rapl",
                Some("v1"),
                Some(&d[..]),
            ),
        ] {
            let r = OciRef::parse(text).unwrap();
            assert_eq!((&r.registry[..], &r.repository[..]), (registry, repo));
            assert_eq!(r.tag.as_deref(), tag);
            assert_eq!(r.digest.as_deref(), digest);
            let printed = r.to_string();
            assert_eq!(OciRef::parse(&printed).unwrap(), r, "{printed}");
        }
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, says) in [
            ("https://x/y", "expected oci://"),
            ("oci://host", "no repository"),
            ("oci://host/Rapl", "lowercase"),
            ("oci://host/a//b", "lowercase"),
            ("oci://host/rapl:", "a tag is"),
            ("oci://host/rapl:-x", "a tag is"),
            ("oci://host/rapl@sha256:abc", "64 lowercase hex"),
            ("oci://host/rapl@md5:abc", "sha256:"),
            ("oci://ho st/rapl", "HOST:PORT"),
            ("oci:///rapl", "HOST:PORT"),
        ] {
            let e = OciRef::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        assert!(OciRef::parse(&format!("oci://h/{}", "a".repeat(2000))).is_err());
    }

    #[test]
    fn only_loopback_registries_are_loopback() {
        for (text, loopback) in [
            ("oci://127.0.0.1:5000/a", true),
            ("oci://127.8.9.10/a", true),
            ("oci://localhost:5000/a", true),
            ("oci://[::1]:5000/a", true),
            ("oci://128.0.0.1/a", false),
            ("oci://localhost.example.com/a", false),
            ("oci://ghcr.io/a", false),
        ] {
            assert_eq!(OciRef::parse(text).unwrap().is_loopback(), loopback, "{text}");
        }
    }

    /// The default `fetch_all`: all of a policy's plugins at once, results
    /// in order.
    #[test]
    fn fetch_all_fetches_every_plugin_at_once_and_keeps_the_order() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};
        #[derive(Default)]
        struct Slow {
            running: AtomicUsize,
            most: AtomicUsize,
        }
        impl Fetch for Slow {
            fn fetch(&self, source: &OciSource) -> Result<Fetched, OciError> {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                self.running.fetch_sub(1, Ordering::SeqCst);
                match source.reference.name().ends_with('7') {
                    true => Err(OciError::Config(source.reference.to_string())),
                    false => Ok(Fetched {
                        path: PathBuf::from(source.reference.name()),
                        sha256: None,
                    }),
                }
            }
            fn poll(&self, _: &OciSource) -> Result<bool, OciError> {
                Ok(false)
            }
        }
        let fetch = Slow::default();
        let sources: Vec<OciSource> = (0..32)
            .map(|i| OciSource::new(OciRef::parse(&format!("oci://h/p{i}:v1")).unwrap()))
            .collect();
        let started = Instant::now();
        let results = fetch.fetch_all(&sources);
        // One round of 200 ms, not 32 (6.4 s): a bound, not a benchmark.
        assert_eq!(results.len(), sources.len());
        assert!(
            started.elapsed() < Duration::from_millis(3200),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(fetch.most.load(Ordering::SeqCst), MAX_PARALLEL_FETCHES);
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(f) => assert_eq!(f.path, PathBuf::from(format!("p{i}"))),
                Err(e) => assert!(i % 10 == 7 && e.to_string().contains(&format!("/p{i}:")), "{i}: {e}"),
            }
        }
    }

    #[test]
    fn digest_pinned_references_are_never_followed() {
        let mut s = OciSource::new(OciRef::parse("oci://h/a:v1").unwrap());
        assert!(!s.follows());
        s.pull_policy = PullPolicy::Always;
        assert!(s.follows());
        s.reference = s.reference.pinned(&format!("sha256:{}", "b".repeat(64)));
        assert!(!s.follows());
    }
}

/// Helpers the engine and the `msrwasm` command share (re-exported by
/// `tools`), not part of the embedding API.
pub(crate) mod local {
    use super::*;

    /// Whether a plugin path names a registry artifact.
    pub fn is_reference(path: &str) -> bool {
        path.starts_with(SCHEME)
    }

    #[cfg(feature = "tools")]
    /// The OCI annotations for a plugin's `msrwasm.meta` fields: `name`,
    /// `version`, `description` and `author` (or `authors`) become
    /// `org.opencontainers.image.title`, `.version`, `.description` and
    /// `.authors`.
    pub fn annotations(
        meta: &std::collections::BTreeMap<String, String>,
    ) -> std::collections::BTreeMap<String, String> {
        [
            ("name", "title"),
            ("version", "version"),
            ("description", "description"),
            ("authors", "authors"),
            ("author", "authors"),
        ]
        .iter()
        .filter_map(|(field, key)| {
            let value = meta.get(*field)?.trim();
            (!value.is_empty()).then(|| (format!("org.opencontainers.image.{key}"), value.to_owned()))
        })
        .collect()
    }
}
