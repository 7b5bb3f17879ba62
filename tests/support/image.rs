//! Small real container images built in Rust: ustar layer tarballs, gzip or plain
//! layers, an OCI image config and manifest, written to an OCI layout and optionally
//! pushed to a registry.

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use zest_oci::digest::Digest;
use zest_oci::layout::OciLayout;
use zest_oci::{media_type, Descriptor, ImageManifest, LayerCompression, Platform, Reference};
use zest_registry::{RegistryClient, UploadBody};

/// A minimal ustar writer (names up to 100 bytes, which test images respect).
#[derive(Default)]
pub struct TarBuilder {
    buf: Vec<u8>,
}

fn octal(field: &mut [u8], value: u64) {
    // Zero-padded octal followed by NUL, filling the field.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert!(s.len() <= digits, "value {value} too large for tar field");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

impl TarBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, path: &str, mode: u32, size: u64, kind: u8, link: &str) {
        assert!(
            path.len() <= 100 && link.len() <= 100,
            "test tar paths must be short: {path}"
        );
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 1_700_000_000);
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
    }

    /// A directory (`path` should end in `/`).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.header(path, mode, 0, b'5', "");
        self
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.header(path, mode, data.len() as u64, b'0', "");
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.header(path, 0o777, 0, b'2', target);
        self
    }

    /// The finished archive (with the two zero end blocks).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// gzip-compresses `data` (deterministic: no name, mtime 0).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// One layer of a built image.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer as stored (compressed or not).
    pub blob: Bytes,
    /// Its descriptor in the manifest.
    pub descriptor: Descriptor,
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// sha256 of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
}

/// A built image: blobs in memory and in an OCI layout.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The image config blob.
    pub config: Bytes,
    /// The manifest blob.
    pub manifest: Bytes,
    /// Its descriptor (as in the layout's index.json, without annotations).
    pub manifest_descriptor: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Layer>,
}

/// Builds an image from layer tars and writes it to the OCI layout at `dir` under
/// `tag`. `compression` is Gzip or Uncompressed (zstd layers are the converter's job).
pub fn build_image(
    dir: &Path,
    tag: &str,
    tars: Vec<Vec<u8>>,
    compression: LayerCompression,
    platform: &Platform,
    entrypoint: &[&str],
) -> TestImage {
    let layout = OciLayout::create(dir).expect("create OCI layout");
    let mut layers = Vec::new();
    for tar in tars {
        let blob = match compression {
            LayerCompression::Gzip => gzip(&tar),
            LayerCompression::Uncompressed => tar.clone(),
            LayerCompression::Zstd => panic!("build_image does not write zstd layers"),
        };
        layout.write_blob(&blob).expect("write layer blob");
        let descriptor = Descriptor::for_bytes(compression.oci_media_type(), &blob);
        layers.push(Layer {
            diff_id: Digest::of(&tar),
            blob: Bytes::from(blob),
            descriptor,
            tar,
        });
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let mut config_json = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Entrypoint": entrypoint,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "zest test image builder"}],
    });
    if let Some(v) = &platform.variant {
        config_json["variant"] = serde_json::Value::String(v.clone());
    }
    let config = serde_json::to_vec(&config_json).expect("serialise config");
    layout.write_blob(&config).expect("write config blob");
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::for_bytes(media_type::OCI_CONFIG, &config),
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        subject: None,
        annotations: Default::default(),
        extra: Default::default(),
    };
    let manifest_bytes = manifest.to_json();
    layout
        .write_blob(&manifest_bytes)
        .expect("write manifest blob");
    let mut manifest_descriptor = Descriptor::for_bytes(media_type::OCI_MANIFEST, &manifest_bytes);
    manifest_descriptor.platform = Some(platform.clone());
    layout
        .add_manifest(manifest_descriptor.clone(), Some(tag))
        .expect("add manifest to index.json");
    TestImage {
        config: Bytes::from(config),
        manifest: Bytes::from(manifest_bytes),
        manifest_descriptor,
        layers,
    }
}

/// A data layer with files of assorted sizes: empty, small text, 1 MiB pseudo-random,
/// 256 KiB of zeros, nested directories and a symlink.
pub fn data_layer_tar(seed: u64) -> Vec<u8> {
    let mut t = TarBuilder::new();
    t.dir("data/", 0o755)
        .file("data/empty", 0o644, b"")
        .file("data/hello.txt", 0o644, b"hello from zest\n")
        .file(
            "data/random.bin",
            0o644,
            &super::pseudo_random(1 << 20, seed),
        )
        .file("data/zeros.bin", 0o600, &vec![0u8; 256 << 10])
        .dir("data/nested/", 0o755)
        .dir("data/nested/deeper/", 0o700)
        .file("data/nested/deeper/file.txt", 0o644, b"deep\n")
        .symlink("data/link", "hello.txt");
    t.finish()
}

/// A busybox layer: `/bin/busybox` (static) with a few applet symlinks and `/etc`
/// basics. `None` (after [`super::require_tool`]) if busybox is not installed.
pub fn busybox_layer_tar() -> Option<Vec<u8>> {
    const BUSYBOX: &str = "/usr/bin/busybox";
    if !super::require_tool(BUSYBOX) {
        return None;
    }
    let bin = std::fs::read(BUSYBOX).expect("read busybox");
    let mut t = TarBuilder::new();
    t.dir("bin/", 0o755).file("bin/busybox", 0o755, &bin);
    for applet in [
        "sh",
        "ls",
        "cat",
        "echo",
        "sleep",
        "true",
        "wc",
        "sha256sum",
        "find",
        "head",
    ] {
        t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.dir("etc/", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\n")
        .dir("tmp/", 0o1777)
        .dir("root/", 0o700);
    Some(t.finish())
}

/// A two-layer busybox + data image (gzip) in an OCI layout at `dir` under `tag`;
/// `None` if busybox is not installed (see [`busybox_layer_tar`]).
pub fn busybox_image(dir: &Path, tag: &str) -> Option<TestImage> {
    let base = busybox_layer_tar()?;
    Some(build_image(
        dir,
        tag,
        vec![base, data_layer_tar(1)],
        LayerCompression::Gzip,
        &Platform::host(),
        &["/bin/sh"],
    ))
}

/// Pushes every blob of `image` and then its manifest under `reference`'s tag (or
/// digest); returns the manifest digest.
pub async fn push_image(
    client: &RegistryClient,
    image: &TestImage,
    reference: &Reference,
) -> Digest {
    let repo = &reference.repository;
    for layer in &image.layers {
        client
            .push_blob(
                repo,
                &layer.descriptor.digest,
                UploadBody::Bytes(layer.blob.clone()),
                None,
            )
            .await
            .expect("push layer");
    }
    client
        .push_blob_bytes(repo, image.config.clone())
        .await
        .expect("push config");
    client
        .push_manifest(
            repo,
            &reference.manifest_ref(),
            media_type::OCI_MANIFEST,
            image.manifest.clone(),
        )
        .await
        .expect("push manifest")
}
