//! A real Prometheus server (Debian's `prometheus`, installed by
//! `tests/setup.sh`, on 127.0.0.1) finds three running VMs through
//! file-based service discovery, scrapes each one's read-only metrics
//! endpoint, and answers per-VM queries with each VM's own count; a VM that
//! ends disappears from discovery.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msrwasm_tests::{guest, kvm_available, start_with, tool_available};

/// Answers MSR 0x4d530000 with its config `count` (how many accesses the
/// guest makes), every other read with its index.
const COUNTER: &str = r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eq (local.get $i) (i32.const 0x4d530000))
      (then (call $reply (call $config (i32.const 0) (i32.const 5) (i64.const 0))))
      (else (call $reply (i64.extend_i32_u (local.get $i)))))
    (i32.const 0)))"#;

/// The Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping every second
    /// whatever `sd_dir` announces.
    fn start(dir: &Path, sd_dir: &Path) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: msrwasm\n    file_sd_configs:\n      - files: ['{}/*.json']\n        refresh_interval: 1s\n",
                sd_dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait("Prometheus to be ready", Duration::from_secs(60), || {
            p.get("/-/ready", &[]).is_some()
        });
        p
    }

    /// GET `path` with URL-encoded `params`; the body if the answer is 2xx.
    fn get(&self, path: &str, params: &[(&str, &str)]) -> Option<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sf", "--max-time", "5", "-G"])
            .arg(format!("{}{path}", self.url));
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let o = cmd.output().ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The instant vector of `query`, by the value of label `by`.
    fn query(&self, query: &str, by: &str) -> BTreeMap<String, f64> {
        let Some(body) = self.get("/api/v1/query", &[("query", query)]) else {
            return BTreeMap::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let label = r["metric"][by].as_str()?.to_owned();
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((label, value))
            })
            .collect()
    }

    /// The `vm` labels of the targets Prometheus scrapes now, with their
    /// last scrape duration (seconds).
    fn targets(&self) -> BTreeMap<String, f64> {
        let Some(body) = self.get("/api/v1/targets", &[("state", "active")]) else {
            return BTreeMap::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some((
                    t["labels"]["vm"].as_str()?.to_owned(),
                    t["lastScrapeDuration"].as_f64().unwrap_or(0.0),
                ))
            })
            .collect()
    }
}

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_real_prometheus_discovers_scrapes_and_forgets_three_vms() {
    if !kvm_available() || !tool_available("prometheus") || !tool_available("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("sd");
    std::fs::create_dir(&sd).unwrap();
    let plugin = dir.path().join("counter.wat");
    std::fs::write(&plugin, COUNTER).unwrap();
    let prometheus = Prometheus::start(dir.path(), &sd);

    // Three VMs, each making its own known number of MSR accesses (the
    // count read first, then that many reads), then staying up.
    let counts = [("vm-a", 40u64), ("vm-b", 120), ("vm-c", 300)];
    let mut vms = BTreeMap::new();
    for (name, count) in counts {
        let mut spec = msrwasm_tests::quick(&plugin);
        spec.plugins[0].config.insert("count".into(), count as i64);
        let vm = start_with(&guest("count_then_idle.elf"), 1, spec, |c| {
            c.name = name.into();
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.metrics_sd_dir = Some(sd.clone());
        })
        .unwrap_or_else(|e| panic!("{e}"));
        vms.insert(name, vm);
    }
    for (name, count) in counts {
        let engine = vms[name].engine.clone();
        wait(&format!("{name} to make its accesses"), Duration::from_secs(60), || {
            engine.stats().total().rdmsr == count + 1
        });
    }

    // Per-VM totals in Prometheus equal each VM's own count.
    let want: BTreeMap<String, f64> = counts.iter().map(|(n, c)| (n.to_string(), (c + 1) as f64)).collect();
    let mut seen = BTreeMap::new();
    let latency = wait("Prometheus to report every VM's count", Duration::from_secs(60), || {
        seen = prometheus.query("sum by (vm) (msrwasm_msr_accesses_total)", "vm");
        seen == want
    });
    for (name, _) in counts {
        assert_eq!(
            vms[name].engine.stats().total().rdmsr as f64,
            want[name],
            "{name} made no access since"
        );
    }
    let scrape = prometheus.targets();
    println!(
        "prometheus: per-VM totals {seen:?} equal the VMs' own counts {:.2} s after the last VM's \
         last access (queried every 0.1 s, scraped every 1 s); last scrape durations {scrape:?} s",
        latency.as_secs_f64()
    );

    // A VM that ends leaves discovery; the others stay.
    let vm_b = vms.remove("vm-b").unwrap();
    vm_b.finish();
    assert!(!sd.join("msrwasm-vm-b.json").exists(), "the entry is removed at exit");
    let gone = wait("vm-b to leave Prometheus' targets", Duration::from_secs(60), || {
        let targets = prometheus.targets();
        !targets.contains_key("vm-b") && targets.contains_key("vm-a") && targets.contains_key("vm-c")
    });
    println!(
        "prometheus: an ended VM left the active targets {:.2} s after it ended",
        gone.as_secs_f64()
    );
    for (_, vm) in vms {
        vm.finish();
    }
    assert_eq!(std::fs::read_dir(&sd).unwrap().count(), 0, "every entry is removed");
}
