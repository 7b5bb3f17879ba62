//! The local profile directory: one learned start-up profile per image manifest
//! (`<dir>/<manifest hex>.json`), recorded here or fetched from a registry.
//!
//! Invariants: a profile read back is decoded and validated again and must name
//! the manifest its file is named after (a bad file is deleted); files are
//! written to a temporary name, synced and renamed, so a crash never leaves a
//! truncated profile; the directory holds at most `max_profiles` profiles, the
//! least recently written dropped first. File work runs on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::LazyError;
use zest_format::profile::{StartupProfile, MAX_PROFILE_BYTES};
use zest_oci::digest::Digest;

/// The profile directory.
#[derive(Clone)]
pub(super) struct ProfileStore {
    dir: Arc<PathBuf>,
    max_profiles: usize,
}

impl ProfileStore {
    /// The store in `dir`, created (mode 0700) if absent.
    pub(super) fn open(dir: PathBuf, max_profiles: usize) -> Result<Self, LazyError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| LazyError::ProfileDir {
                path: dir.clone(),
                source,
            })?;
        Ok(ProfileStore {
            dir: Arc::new(dir),
            max_profiles: max_profiles.max(1),
        })
    }

    /// The path of the profile of image manifest `image`.
    pub(super) fn path(dir: &Path, image: &Digest) -> PathBuf {
        dir.join(format!("{}.json", image.hex()))
    }

    /// The profile of image manifest `image`, if one is kept and valid.
    pub(super) async fn load(&self, image: Digest) -> Option<StartupProfile> {
        let dir = Arc::clone(&self.dir);
        tokio::task::spawn_blocking(move || load_blocking(&dir, image))
            .await
            .ok()
            .flatten()
    }

    /// Keeps `profile` (replacing an older one of the same image), then drops
    /// the oldest profiles beyond the bound. Failures are logged: a profile is
    /// an optimisation, never a reason to fail.
    pub(super) async fn save(&self, profile: &StartupProfile) {
        let dir = Arc::clone(&self.dir);
        let max = self.max_profiles;
        let bytes = profile.encode();
        let image = profile.image();
        let joined = tokio::task::spawn_blocking(move || {
            save_blocking(&dir, &image, &bytes)?;
            prune_blocking(&dir, max);
            Ok::<_, std::io::Error>(())
        })
        .await;
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(%image, error = %e, "cannot keep the start-up profile in the state directory")
            }
            Err(e) => tracing::warn!(%image, error = %e, "profile write task failed"),
        }
    }
}

fn load_blocking(dir: &Path, image: Digest) -> Option<StartupProfile> {
    use std::io::Read;
    let path = ProfileStore::path(dir, &image);
    let file = std::fs::File::open(&path).ok()?;
    let mut bytes = Vec::new();
    // One byte more than allowed, so that an oversized file is refused.
    if let Err(e) = file.take(MAX_PROFILE_BYTES + 1).read_to_end(&mut bytes) {
        tracing::warn!(path = %path.display(), error = %e, "cannot read a kept start-up profile");
        return None;
    }
    match StartupProfile::decode(&bytes).and_then(|p| p.check_image(image).map(|()| p)) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "kept start-up profile is invalid; deleting it");
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

fn save_blocking(dir: &Path, image: &Digest, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = ProfileStore::path(dir, image);
    let tmp = dir.join(format!(".{}.tmp", image.hex()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)
}

/// Drops the least recently written profiles beyond `max`.
fn prune_blocking(dir: &Path, max: usize) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = read
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= max {
        return;
    }
    files.sort();
    let excess = files.len() - max;
    for (_, path) in files.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zest_format::profile::ProfileEntry;

    fn profile(image: Digest) -> StartupProfile {
        StartupProfile::new(
            image,
            vec![ProfileEntry {
                layer: Digest::of(b"layer"),
                path: "bin/app".into(),
                ms: Some(1),
            }],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn kept_profiles_are_bounded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path().join("profiles"), 2).unwrap();
        let images: Vec<Digest> = (0u8..3).map(|i| Digest::of(&[i])).collect();
        for image in &images {
            store.save(&profile(*image)).await;
            // Distinct modification times for the pruning order.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(store.load(images[0]).await.is_none(), "oldest kept");
        assert_eq!(store.load(images[2]).await, Some(profile(images[2])));
        // A profile filed under another image's name is refused and deleted.
        let wrong = ProfileStore::path(&dir.path().join("profiles"), &images[1]);
        std::fs::write(&wrong, profile(images[2]).encode()).unwrap();
        assert!(store.load(images[1]).await.is_none());
        assert!(!wrong.exists());
    }
}
