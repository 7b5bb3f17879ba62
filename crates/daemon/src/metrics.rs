//! Prometheus metrics of the service, in the text exposition format (version 0.0.4),
//! served on an optional HTTP listener (`snapshotter.metrics_address`).
//!
//! What is exported: fallbacks to a normal pull by reason, lazy mounts and restores,
//! TOC and manifest fetches, the fetchers' counters summed over every layer (range
//! requests, bytes, blocking misses, verification failures, failed fetches by error
//! kind), the chunk cache (hits,
//! misses, bytes, evictions) and the registry client (requests and bytes per kind).
//!
//! The HTTP side is deliberately tiny: one request per connection, `GET /metrics`
//! only, the request head bounded in size and time, at most a few connections at
//! once. Values are read from counters when scraped; nothing is computed in between.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::lazy::LazyLayerProvider;
use zest_snapshotter::SnapshotStore;

/// Largest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// Time allowed to read a request and write the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// Where metric values come from.
#[derive(Clone)]
pub struct Metrics {
    store: SnapshotStore,
    provider: Option<Arc<LazyLayerProvider>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("lazy", &self.provider.is_some())
            .finish()
    }
}

/// Builds the text exposition: one `# HELP`/`# TYPE` header per metric family.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn value(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.value(name, &[], value);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Metrics of `store` and, when lazy pulling is on, of `provider`.
    pub fn new(store: SnapshotStore, provider: Option<Arc<LazyLayerProvider>>) -> Self {
        Metrics { store, provider }
    }

    /// The current values in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut e = Exposition { out: String::new() };
        e.family(
            "zest_fallbacks_total",
            "counter",
            "Layers pulled normally instead of mounted lazily, by reason.",
        );
        for (reason, count) in self.store.fallback_counts() {
            e.value("zest_fallbacks_total", &[("reason", reason.code())], count);
        }
        e.single(
            "zest_lazy_enabled",
            "gauge",
            "1 when lazy pulling is configured.",
            u64::from(self.provider.is_some()),
        );
        let Some(provider) = &self.provider else {
            return e.out;
        };
        let s = provider.stats();
        let gauges = [
            (
                "zest_lazy_mounted_layers",
                "Snapshot directories with a live lazy mount.",
                s.mounted,
            ),
            (
                "zest_lazy_restoring_layers",
                "Stored lazy layers not mounted again yet after a restart.",
                s.restoring,
            ),
            (
                "zest_lazy_layer_indexes",
                "Layer indexes (parsed TOCs) held in memory.",
                s.layers,
            ),
            (
                "zest_lazy_idle_layer_indexes",
                "Layer indexes held for layers no mount uses.",
                s.idle_layers,
            ),
        ];
        for (name, help, value) in gauges {
            e.single(name, "gauge", help, value as u64);
        }
        let (ring_requests, ring_mounts) = zest_fs::io_uring_totals();
        e.single(
            "zest_fuse_io_uring_mounts",
            "gauge",
            "Live layer mounts whose requests the kernel delivers through io_uring.",
            ring_mounts as u64,
        );
        e.single(
            "zest_fuse_io_uring_requests_total",
            "counter",
            "FUSE requests received through io_uring ring entries.",
            ring_requests,
        );
        let counters = [
            (
                "zest_lazy_mounts_total",
                "Lazy layer mounts made.",
                s.mounts_total,
            ),
            (
                "zest_lazy_restores_total",
                "Stored layers mounted afresh after a restart (no live connection to take over).",
                s.restores_total,
            ),
            (
                "zest_lazy_takeovers_total",
                "Stored layers whose live FUSE connection was taken over after a restart.",
                s.takeovers_total,
            ),
            (
                "zest_lazy_restore_failures_total",
                "Failed attempts to mount a stored layer again.",
                s.restore_failures_total,
            ),
            (
                "zest_lazy_check_failures_total",
                "Reachability checks of lazy layers that failed.",
                s.check_failures_total,
            ),
            (
                "zest_toc_fetches_total",
                "Layer TOCs fetched from registries.",
                s.toc_fetches_total,
            ),
            (
                "zest_toc_fetched_bytes_total",
                "Compressed TOC bytes fetched from registries.",
                s.toc_bytes_total,
            ),
            (
                "zest_toc_local_loads_total",
                "Layer TOCs read locally: from the TOC directory, or from containerd's content store where zest pull stored them.",
                s.toc_local_loads_total,
            ),
            (
                "zest_toc_prefetches_total",
                "TOCs of following layers fetched ahead of their prepare.",
                s.toc_prefetches_total,
            ),
            (
                "zest_library_prefetch_files_total",
                "ELF files library prefetch examined (programs read from their start, and the libraries they need).",
                s.library_prefetch.elf_files,
            ),
            (
                "zest_library_prefetch_libraries_total",
                "Needed shared libraries library prefetch found in an image's layers.",
                s.library_prefetch.libraries,
            ),
            (
                "zest_library_prefetch_bytes_total",
                "Compressed bytes library prefetch fetched (shared libraries, Python modules, headers).",
                s.library_prefetch.bytes,
            ),
            (
                "zest_python_import_prefetch_modules_total",
                "Python modules fetched ahead of the import that reads them.",
                s.library_prefetch.python_modules,
            ),
            (
                "zest_include_prefetch_headers_total",
                "C and C++ headers fetched ahead of the compiler's read.",
                s.library_prefetch.headers,
            ),
            (
                "zest_process_command_prefetches_total",
                "Commands of processes in containers prefetched when they started (other than images' own start commands).",
                s.library_prefetch.processes,
            ),
            (
                "zest_manifest_fetches_total",
                "Image manifests fetched for lazy mounts.",
                s.manifest_fetches_total,
            ),
            (
                "zest_local_content_reads_total",
                "Image manifests and configs read from containerd's content store instead of the registry.",
                s.local_content_reads_total,
            ),
            (
                "zest_fetch_range_requests_total",
                "Range requests for layer chunks, retries included.",
                s.fetch.range_requests,
            ),
            (
                "zest_fetch_bytes_total",
                "Compressed chunk bytes received.",
                s.fetch.bytes_fetched,
            ),
            (
                "zest_fetch_blocking_misses_total",
                "Reads that waited for the network.",
                s.fetch.blocking_misses,
            ),
            (
                "zest_fetch_chunks_verified_total",
                "Chunks fetched and verified against their digest.",
                s.fetch.chunks_verified,
            ),
            (
                "zest_fetch_verification_failures_total",
                "Chunks that failed verification (never served).",
                s.fetch.verification_failures,
            ),
            (
                "zest_fetch_retries_total",
                "Chunk runs fetched again after failing verification (network retries are zest_registry_retries_total).",
                s.fetch.retries,
            ),
            (
                "zest_fetch_prefetch_bytes_total",
                "Compressed bytes fetched by prefetch and background fetch.",
                s.fetch.prefetch_bytes,
            ),
            (
                "zest_fetch_speculative_bytes_total",
                "Compressed bytes fetched on a guess along with a miss (read-ahead, neighbour files, library directories).",
                s.fetch.speculative_bytes,
            ),
            (
                "zest_fetch_speculative_used_bytes_total",
                "Of zest_fetch_speculative_bytes_total, the bytes a read has used since; the rest is the cost of guessing.",
                s.fetch.speculative_used_bytes,
            ),
            (
                "zest_fetch_deduplicated_waits_total",
                "Chunk waits that joined a fetch in flight.",
                s.fetch.deduplicated_waits,
            ),
        ];
        for (name, help, value) in counters {
            e.single(name, "counter", help, value);
        }
        let p = &s.profiles;
        let profile_counters = [
            (
                "zest_profiles_recorded_total",
                "Start-up profiles recorded from an image's first lazy start and kept.",
                p.recorded,
            ),
            (
                "zest_profiles_published_total",
                "Start-up profiles pushed to the image's repository as referrers.",
                p.published,
            ),
            (
                "zest_profile_publish_failures_total",
                "Start-up profiles that could not be published (no push rights, registry errors).",
                p.publish_failures,
            ),
            (
                "zest_profile_fetch_failures_total",
                "Lookups of a start-up profile in a registry that failed (none found is not a failure).",
                p.fetch_failures,
            ),
            (
                "zest_profile_prefetch_bytes_total",
                "Compressed bytes fetched at mount time because of start-up profiles.",
                p.prefetched_bytes,
            ),
        ];
        for (name, help, value) in profile_counters {
            e.single(name, "counter", help, value);
        }
        e.family(
            "zest_profiles_fetched_total",
            "counter",
            "Start-up profiles taken into use, by source (local: the state directory; registry: the image's repository).",
        );
        e.value(
            "zest_profiles_fetched_total",
            &[("source", "local")],
            p.fetched_local,
        );
        e.value(
            "zest_profiles_fetched_total",
            &[("source", "registry")],
            p.fetched_registry,
        );
        e.family(
            "zest_fetch_failures_total",
            "counter",
            "Fetches of chunk runs that failed, by kind (not_found, denied, rate_limited, timeout, digest_mismatch, ...).",
        );
        for (kind, count) in s.fetch.failures.iter() {
            e.value(
                "zest_fetch_failures_total",
                &[("kind", kind.label())],
                count,
            );
        }

        // Every sample of a family must follow its header: one family at a time,
        // both tiers in each.
        let memory = &s.cache.memory;
        let disk = s.cache.disk.as_ref();
        type TierValue = fn(&zest_cache::MemoryStats) -> u64;
        type DiskValue = fn(&zest_cache::DiskStats) -> u64;
        let tiers: [(&str, &str, &str, TierValue, DiskValue); 5] = [
            (
                "zest_cache_hits_total",
                "counter",
                "Chunk cache lookups that found the chunk, by tier.",
                |m| m.hits,
                |d| d.hits,
            ),
            (
                "zest_cache_misses_total",
                "counter",
                "Chunk cache lookups that did not find the chunk, by tier.",
                |m| m.misses,
                |d| d.misses,
            ),
            (
                "zest_cache_evictions_total",
                "counter",
                "Chunks evicted to stay within budget, by tier.",
                |m| m.evictions,
                |d| d.evictions,
            ),
            (
                "zest_cache_bytes",
                "gauge",
                "Bytes held by the chunk cache, by tier.",
                |m| m.bytes,
                |d| d.bytes,
            ),
            (
                "zest_cache_capacity_bytes",
                "gauge",
                "Byte budget of the chunk cache, by tier.",
                |m| m.capacity_bytes,
                |d| d.budget_bytes,
            ),
        ];
        for (name, kind, help, of_memory, of_disk) in tiers {
            e.family(name, kind, help);
            e.value(name, &[("tier", "memory")], of_memory(memory));
            if let Some(disk) = disk {
                e.value(name, &[("tier", "disk")], of_disk(disk));
            }
        }
        if let Some(disk) = disk {
            e.single(
                "zest_cache_disk_corruptions_total",
                "counter",
                "Disk cache files that failed verification when read (deleted).",
                disk.corruptions,
            );
        }
        e.single(
            "zest_cache_write_dropped_total",
            "counter",
            "Chunks not written to disk because the write queue was full.",
            s.cache.writes.dropped_full,
        );

        let r = &s.registry;
        e.family(
            "zest_registry_requests_total",
            "counter",
            "HTTP requests to registries, by kind.",
        );
        let kinds = [
            ("manifest", r.manifest_requests, r.manifest_bytes),
            ("blob", r.blob_requests, r.blob_bytes),
            ("range", r.range_requests, r.range_bytes),
            ("upload", r.upload_requests, r.upload_bytes),
        ];
        for (kind, requests, _) in kinds {
            e.value("zest_registry_requests_total", &[("kind", kind)], requests);
        }
        e.value(
            "zest_registry_requests_total",
            &[("kind", "auth")],
            r.auth_requests,
        );
        e.family(
            "zest_registry_bytes_total",
            "counter",
            "Payload bytes received from registries (uploads: sent), by kind.",
        );
        for (kind, _, bytes) in kinds {
            e.value("zest_registry_bytes_total", &[("kind", kind)], bytes);
        }
        e.single(
            "zest_registry_retries_total",
            "counter",
            "Registry requests repeated after a transient failure.",
            r.retries,
        );
        e.out
    }
}

/// Binds the metrics listener. Warns when the address is not loopback: the endpoint
/// has no authentication.
pub async fn bind_metrics(address: SocketAddr) -> std::io::Result<TcpListener> {
    if !address.ip().is_loopback() {
        tracing::warn!(%address, "the metrics endpoint listens beyond loopback and has no authentication");
    }
    TcpListener::bind(address).await
}

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted.
pub async fn serve_metrics(listener: TcpListener, metrics: Metrics) {
    let metrics = Arc::new(metrics);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // Too many scrapers at once: drop the connection rather than queue.
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(IO_TIMEOUT, answer(stream, &metrics)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let body = metrics.render();
            respond(&mut stream, "200 OK", &body).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "try /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "").await,
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// Every sample follows its own family's `# TYPE` line, and no family repeats.
    fn assert_families_grouped(text: &str) {
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines().skip_while(|l| !l.starts_with('#')) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap_or_default().to_owned();
                assert!(seen.insert(current.clone()), "family {current} repeated");
            } else if !line.starts_with('#') && !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                assert_eq!(name, current, "sample {line:?} outside its family");
            }
        }
    }

    #[tokio::test]
    async fn lazy_exposition_is_well_formed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), zest_snapshotter::StoreOptions::default())?;
        let cache = zest_cache::ChunkCache::open(&zest_cache::CacheConfig {
            disk_root: dir.path().join("cache"),
            disk_bytes: 1 << 20,
            ..zest_cache::CacheConfig::default()
        })?;
        let client = zest_registry::RegistryClient::new(zest_registry::RegistryConfig {
            hosts_dir: None,
            docker_config: zest_registry::DockerConfigSource::Disabled,
            ..zest_registry::RegistryConfig::default()
        })?;
        let provider = LazyLayerProvider::new(
            client,
            Arc::new(cache),
            crate::LazyConfig::new(dir.path().join("tocs")),
        )?;
        let text = Metrics::new(store, Some(provider)).render();
        assert_families_grouped(&text);
        for expected in [
            "zest_lazy_enabled 1",
            "zest_cache_hits_total{tier=\"disk\"} 0",
            "zest_registry_requests_total{kind=\"range\"} 0",
            "zest_fetch_blocking_misses_total 0",
            "zest_fetch_failures_total{kind=\"not_found\"} 0",
            "zest_fetch_failures_total{kind=\"digest_mismatch\"} 0",
            "zest_fetch_failures_total{kind=\"timeout\"} 0",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn serves_the_exposition_over_http() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::open(dir.path(), zest_snapshotter::StoreOptions::default())?;
        let listener = bind_metrics(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(serve_metrics(listener, Metrics::new(store, None)));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(address).await?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        let text = get("/metrics").await?;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(
            text.contains("# TYPE zest_fallbacks_total counter"),
            "{text}"
        );
        assert!(text.contains("zest_lazy_enabled 0"), "{text}");
        assert_families_grouped(&text);
        let text = get("/other").await?;
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        server.abort();
        Ok(())
    }
}
