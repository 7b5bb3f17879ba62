//! `zest inspect REF`: an image's layers, their formats, and for zstd:chunked and eStargz
//! layers the table of contents — what a lazy pull fetches up front and what it can skip.

use anyhow::Context;
use clap::Args;
use indicatif::HumanBytes;
use serde::Serialize;

use zest_fetch::toc::{fetch_layer_index, TocFetchOptions};
use zest_format::{EntryId, EntryKind, LayerIndex, TocLocation};
use zest_oci::{media_type, Descriptor, LayerCompression, Platform};
use zest_store::{ImageRef, ImageStore};

use super::registry_args::RegistryArgs;

/// Arguments of `zest inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Image: a registry reference or `oci:DIR[:TAG]`.
    pub image: String,

    /// Platform to show when the image is a multi-platform index (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<Platform>,

    /// Also list every entry of each zstd:chunked layer's table of contents.
    #[arg(long)]
    pub toc: bool,

    /// Only this layer (0 = bottom).
    #[arg(long, value_name = "N")]
    pub layer: Option<usize>,

    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Serialize)]
struct ImageReport {
    image: String,
    manifest: String,
    layers: Vec<LayerReport>,
}

#[derive(Debug, Serialize)]
struct LayerReport {
    index: usize,
    digest: String,
    size: u64,
    media_type: String,
    /// `zstd:chunked`, `eStargz`, `zstd`, `gzip`, `tar`, or the media type.
    format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    toc: Option<TocReport>,
}

#[derive(Debug, Serialize)]
struct TocReport {
    /// Whether the manifest vouches for the TOC (its digest annotation).
    authenticated: bool,
    /// Bytes a lazy mount fetches before serving anything (the compressed TOC).
    toc_bytes: u64,
    range_requests: u32,
    entries: usize,
    regular_files: usize,
    file_bytes: u64,
    chunks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefetch_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    list: Vec<TocEntry>,
}

#[derive(Debug, Serialize)]
struct TocEntry {
    path: String,
    kind: &'static str,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    chunks: usize,
    /// Compressed bytes a first read of the whole file fetches.
    fetch_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

pub async fn run(args: InspectArgs) -> anyhow::Result<()> {
    restore_sigpipe();
    let client = args.registry.client()?;
    let image: ImageRef = args
        .image
        .parse()
        .with_context(|| format!("image {:?}", args.image))?;
    let store = ImageStore::open(&image, &client).with_context(|| format!("opening {image}"))?;
    let platform = args.platform.clone().unwrap_or_else(Platform::host);
    let resolved = store
        .resolve(&platform)
        .await
        .with_context(|| format!("resolving {image}"))?;

    let mut layers = Vec::new();
    for (index, layer) in resolved.manifest.layers.iter().enumerate() {
        if args.layer.is_some_and(|n| n != index) {
            continue;
        }
        layers.push(
            inspect_layer(&store, index, layer, args.toc)
                .await
                .with_context(|| format!("layer {index} ({}) of {image}", layer.digest))?,
        );
    }
    let report = ImageReport {
        image: image.to_string(),
        manifest: resolved.descriptor.digest.to_string(),
        layers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn inspect_layer(
    store: &ImageStore,
    index: usize,
    layer: &Descriptor,
    list: bool,
) -> anyhow::Result<LayerReport> {
    let compression = LayerCompression::from_media_type(&layer.media_type);
    let annotated = matches!(
        TocLocation::from_annotations(&layer.annotations),
        Ok(Some(_))
    );
    let mut report = LayerReport {
        index,
        digest: layer.digest.to_string(),
        size: layer.size,
        media_type: media_type::essence(&layer.media_type).to_string(),
        format: match compression {
            Some(LayerCompression::Zstd) => "zstd",
            Some(LayerCompression::Gzip) => "gzip",
            Some(LayerCompression::Uncompressed) => "tar",
            None => "unknown",
        }
        .to_string(),
        toc: None,
    };
    // An eStargz layer names its TOC digest in an annotation.
    let estargz = compression == Some(LayerCompression::Gzip)
        && layer
            .annotations
            .contains_key(zest_format::estargz::TOC_DIGEST_ANNOTATION);
    // A zstd layer without annotations may still carry a footer (an image whose
    // manifest lost its annotations): try it, and say so when it is plain zstd.
    if compression != Some(LayerCompression::Zstd) && !estargz {
        return Ok(report);
    }
    let source = store.layer_source(layer)?;
    let fetched = match fetch_layer_index(
        source.as_ref(),
        layer.size,
        &layer.annotations,
        &TocFetchOptions::default(),
    )
    .await
    {
        Ok(f) => f,
        Err(e) if !annotated && !estargz => {
            tracing::debug!(error = %e, "zstd layer without a zstd:chunked footer");
            return Ok(report);
        }
        Err(e) => return Err(e).context("reading the table of contents"),
    };
    report.format = if estargz { "eStargz" } else { "zstd:chunked" }.to_string();
    let idx = &fetched.index;
    let location = idx.location();
    let mut toc = TocReport {
        authenticated: fetched.authenticated,
        toc_bytes: location.toc.compressed_len,
        range_requests: fetched.requests,
        entries: idx.len(),
        regular_files: 0,
        file_bytes: 0,
        chunks: idx.all_chunks().len(),
        prefetch_bytes: idx.prefetch_extent().map(|r| r.end - r.start),
        list: Vec::new(),
    };
    for id in idx.files_in_blob_order() {
        toc.regular_files += 1;
        toc.file_bytes += idx.entry(id).size();
    }
    if list {
        walk(idx, EntryId::ROOT, String::new(), &mut toc.list);
    }
    report.toc = Some(toc);
    Ok(report)
}

/// Lists the tree depth-first in name order, as `tar -t` would.
fn walk(idx: &LayerIndex, dir: EntryId, prefix: String, out: &mut Vec<TocEntry>) {
    // An explicit stack bounds recursion depth on hostile, deeply nested trees.
    let mut stack = vec![(dir, prefix)];
    while let Some((dir, prefix)) = stack.pop() {
        let mut subdirs = Vec::new();
        for child in idx.children(dir) {
            let entry = idx.entry(child.id);
            let path = format!("{prefix}{}", String::from_utf8_lossy(child.name));
            let chunks = entry.chunks();
            let kind = entry.kind();
            out.push(TocEntry {
                path: path.clone(),
                kind: kind_name(kind),
                mode: format!("{:04o}", entry.mode() & 0o7777),
                uid: entry.uid(),
                gid: entry.gid(),
                size: entry.size(),
                chunks: chunks.len(),
                fetch_bytes: chunks.iter().map(|c| u64::from(c.compressed_len)).sum(),
                link: entry
                    .link_target()
                    .map(|t| String::from_utf8_lossy(t).into_owned()),
            });
            if kind == EntryKind::Dir {
                subdirs.push((child.id, format!("{path}/")));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Dir => "dir",
        EntryKind::Reg => "reg",
        EntryKind::Symlink => "symlink",
        EntryKind::Char => "char",
        EntryKind::Block => "block",
        EntryKind::Fifo => "fifo",
        EntryKind::Whiteout => "whiteout",
    }
}

fn print_report(report: &ImageReport) {
    println!("image:    {}", report.image);
    println!("manifest: {}", report.manifest);
    let total: u64 = report.layers.iter().map(|l| l.size).sum();
    let upfront: u64 = report
        .layers
        .iter()
        .filter_map(|l| l.toc.as_ref().map(|t| t.toc_bytes))
        .sum();
    let lazy = report.layers.iter().filter(|l| l.toc.is_some()).count();
    println!();
    println!(
        "{:>3}  {:<19}  {:>10}  {:<13}  {:>8}  {:>7}  {:>10}",
        "#", "digest", "size", "format", "entries", "chunks", "toc"
    );
    for l in &report.layers {
        let (entries, chunks, toc) = match &l.toc {
            Some(t) => (
                t.entries.to_string(),
                t.chunks.to_string(),
                HumanBytes(t.toc_bytes).to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>3}  {:<19}  {:>10}  {:<13}  {:>8}  {:>7}  {:>10}",
            l.index,
            l.digest.get(..19).unwrap_or(&l.digest),
            HumanBytes(l.size).to_string(),
            l.format,
            entries,
            chunks,
            toc
        );
    }
    println!();
    println!(
        "{lazy} of {} layers are lazily pullable: a lazy pull fetches {} of metadata up front \
         ({:.2}% of {}), then only the chunks that are read.",
        report.layers.len(),
        HumanBytes(upfront),
        if total == 0 {
            0.0
        } else {
            upfront as f64 * 100.0 / total as f64
        },
        HumanBytes(total),
    );
    for l in &report.layers {
        let Some(t) = &l.toc else { continue };
        if !t.authenticated {
            println!(
                "note: layer {}'s TOC was found by its footer, not vouched for by the manifest",
                l.index
            );
        }
        if t.list.is_empty() {
            continue;
        }
        println!("\nlayer {} ({}):", l.index, l.digest);
        println!(
            "{:<8} {:>5} {:>11} {:>10} {:>6} {:>10}  path",
            "type", "mode", "uid:gid", "size", "chunks", "fetch"
        );
        for e in &t.list {
            let link = e
                .link
                .as_deref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            println!(
                "{:<8} {:>5} {:>11} {:>10} {:>6} {:>10}  {}{link}",
                e.kind,
                e.mode,
                format!("{}:{}", e.uid, e.gid),
                e.size,
                e.chunks,
                HumanBytes(e.fetch_bytes).to_string(),
                e.path
            );
        }
    }
}

/// Lets `zest inspect | head` end quietly, as other listing tools do, instead of
/// failing on a closed pipe. Only for this printing command: the daemon keeps
/// SIGPIPE ignored so that a closed socket never kills it.
fn restore_sigpipe() {
    // SAFETY: resetting a signal disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
