//! Learned start-up profiles of images: recorded from an image's first lazy start,
//! kept locally, published beside the image as an OCI referrer, fetched by other
//! nodes, and used to fetch each layer's start-up files at mount time.
//!
//! Per image manifest (the platform manifest a snapshot's labels resolve to):
//! - when its first layer is about to be mounted (before that layer's table of
//!   contents is fetched, so the lookup overlaps it), the profile kept in the
//!   profile directory is used; without one, recording starts (every mount of the
//!   image gets an [`AccessRecorder`]) and, in the background, the image's
//!   repository is asked for one (referrers API and referrers tag schema at
//!   once). A profile found there ends the recording: the image has one already;
//! - recording ends after the window, or when the image's last lazy mount goes
//!   away; the layers' first reads are merged by time into one profile, kept, and
//!   published when configured;
//! - with a profile, each mounted layer's files of the profile are fetched in
//!   profile order through the layer's fetcher ([`Fetcher::fetch_files`]), within
//!   a byte budget per image.
//!
//! Invariants: nothing here delays a mount or a read (lookups, publishing and
//! prefetch are background tasks that end with the service); a profile is only
//! advice: every byte it causes to be fetched is verified like any other; a
//! profile from a registry is verified against its digests, size-capped before it
//! is read, validated, and must name this image manifest; publishing failures
//! (no push rights, a registry without room) are counted and logged once per
//! repository, never surfaced to a container; memory is bounded (images tracked,
//! files recorded, profile size).

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::cancel::Cancel;
use super::profile_store::ProfileStore;
use super::LazyError;
use zest_fetch::Fetcher;
use zest_format::profile::{
    validate_path, ProfileEntry, StartupProfile, MAX_PROFILE_BYTES, PROFILE_MEDIA_TYPE,
};
use zest_format::EntryKind;
use zest_fs::AccessRecorder;
use zest_oci::digest::Digest;
use zest_oci::{media_type, Descriptor, ImageManifest, Repository};
use zest_registry::{ErrorKind, RegistryClient, RegistryError};

/// Media type and content of the empty config of a profile artifact.
const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";

/// Annotation with the creation time of a published profile (RFC 3339, UTC).
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Annotation with the version of zest that recorded it.
const ANNOTATION_ZEST_VERSION: &str = "io.github.zest.version";
/// Annotations naming the profile blob of a published profile. The referrers
/// index copies a manifest's annotations into its descriptor, so a reader can
/// fetch the blob straight from the listing, one round trip before the
/// manifest would have named it. The blob is verified against this digest and
/// names its image itself, so the shortcut trusts nothing the manifest path
/// does not.
const ANNOTATION_PROFILE_DIGEST: &str = "io.github.zest.profile.digest";
const ANNOTATION_PROFILE_SIZE: &str = "io.github.zest.profile.size";

/// Images whose profile state is kept in memory; beyond, the images without a
/// recording in progress are forgotten (their profile is on disk).
const MAX_TRACKED_IMAGES: usize = 512;

/// Settings of the profile work ([`crate::config::ProfilesSection`]).
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    /// Record profiles of images that have none.
    pub record: bool,
    /// Look for profiles in registries.
    pub fetch: bool,
    /// Push recorded profiles.
    pub publish: bool,
    /// Fetch profile files at mount time.
    pub prefetch: bool,
    /// Recording window after an image's first lazy mount.
    pub window: Duration,
    /// Most files recorded.
    pub max_files: usize,
    /// Most compressed bytes prefetched per image.
    pub max_prefetch_bytes: u64,
    /// Most profiles kept locally.
    pub max_local_profiles: usize,
    /// The profile directory.
    pub dir: PathBuf,
}

/// Counters of the profile work.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileStats {
    /// Profiles recorded and kept.
    pub recorded: u64,
    /// Profiles pushed to a registry.
    pub published: u64,
    /// Failed publications.
    pub publish_failures: u64,
    /// Profiles taken from the local directory.
    pub fetched_local: u64,
    /// Profiles fetched from a registry.
    pub fetched_registry: u64,
    /// Failed registry lookups (a registry with no profile is not a failure).
    pub fetch_failures: u64,
    /// Compressed bytes fetched because of profiles.
    pub prefetched_bytes: u64,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    published: AtomicU64,
    publish_failures: AtomicU64,
    fetched_local: AtomicU64,
    fetched_registry: AtomicU64,
    fetch_failures: AtomicU64,
    prefetched_bytes: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The recording of one image: one recorder per layer, timed from one origin.
struct Session {
    origin: Instant,
    recorders: Vec<(Digest, Arc<AccessRecorder>)>,
}

/// What is known of one image.
struct ImageState {
    repository: Repository,
    subject: Descriptor,
    profile: Option<Arc<StartupProfile>>,
    session: Option<Session>,
    /// Layers mounted while no profile was known, for a profile found later.
    waiting: Vec<(Digest, Weak<Fetcher>)>,
    /// Layers whose profile files were prefetched already.
    prefetched: HashSet<Digest>,
    /// Bytes of the prefetch budget left.
    budget: Arc<AtomicU64>,
}

/// The profile work of a lazy layer provider.
pub(super) struct Profiles {
    settings: ProfileSettings,
    store: ProfileStore,
    client: RegistryClient,
    images: Mutex<HashMap<Digest, ImageState>>,
    counters: Counters,
    /// Repositories a publication was refused for (warned once each).
    refused: Mutex<HashSet<Repository>>,
    stop: Arc<Cancel>,
}

impl Profiles {
    pub(super) fn new(
        settings: ProfileSettings,
        client: RegistryClient,
        stop: Arc<Cancel>,
    ) -> Result<Arc<Self>, LazyError> {
        let store = ProfileStore::open(settings.dir.clone(), settings.max_local_profiles)?;
        Ok(Arc::new(Profiles {
            settings,
            store,
            client,
            images: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            refused: Mutex::new(HashSet::new()),
            stop,
        }))
    }

    pub(super) fn stats(&self) -> ProfileStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProfileStats {
            recorded: g(&c.recorded),
            published: g(&c.published),
            publish_failures: g(&c.publish_failures),
            fetched_local: g(&c.fetched_local),
            fetched_registry: g(&c.fetched_registry),
            fetch_failures: g(&c.fetch_failures),
            prefetched_bytes: g(&c.prefetched_bytes),
        }
    }

    fn active(&self) -> bool {
        let s = &self.settings;
        s.record || s.fetch || s.prefetch
    }

    /// Image `subject` (from `repository`) is about to have a layer mounted:
    /// takes up its profile state (the kept profile, else a recording) and,
    /// without a kept profile, starts asking the repository for one. Called
    /// before the layer's table of contents is fetched, so that the lookup's
    /// round trips overlap that work rather than follow it.
    pub(super) async fn on_image(self: &Arc<Self>, repository: &Repository, subject: &Descriptor) {
        if !self.active() {
            return;
        }
        let image = subject.digest;
        if self.images.lock().contains_key(&image) {
            return;
        }
        let local = self.store.load(image).await;
        let start_lookup = {
            let mut images = self.images.lock();
            if images.contains_key(&image) {
                return;
            }
            if images.len() >= MAX_TRACKED_IMAGES {
                images.retain(|_, s| s.session.is_some());
            }
            let profile = local.map(Arc::new);
            if profile.is_some() {
                bump(&self.counters.fetched_local, 1);
                tracing::info!(%image, "start-up profile found in the state directory");
            }
            let session = (profile.is_none() && self.settings.record).then(|| Session {
                origin: Instant::now(),
                recorders: Vec::new(),
            });
            if session.is_some() {
                self.spawn_window_end(image);
            }
            let start_lookup = profile.is_none() && self.settings.fetch;
            images.insert(
                image,
                ImageState {
                    repository: repository.clone(),
                    subject: subject.clone(),
                    profile,
                    session,
                    waiting: Vec::new(),
                    prefetched: HashSet::new(),
                    budget: Arc::new(AtomicU64::new(self.settings.max_prefetch_bytes)),
                },
            );
            start_lookup
        };
        if start_lookup {
            self.spawn_lookup(image, repository.clone());
        }
    }

    /// A layer `layer` of image `subject` (from `repository`) is about to be
    /// mounted through `fetcher`: starts what the image's profile state calls
    /// for and returns the recorder the mount must use, if the image is being
    /// recorded.
    pub(super) async fn on_mount(
        self: &Arc<Self>,
        repository: &Repository,
        subject: &Descriptor,
        layer: Digest,
        fetcher: &Arc<Fetcher>,
    ) -> Option<Arc<AccessRecorder>> {
        if !self.active() {
            return None;
        }
        // Normally done already (before the table of contents was fetched);
        // the state may have been forgotten since (MAX_TRACKED_IMAGES).
        self.on_image(repository, subject).await;
        let image = subject.digest;
        let (recorder, prefetch) = {
            let mut images = self.images.lock();
            let state = images.get_mut(&image)?;
            let recorder = state.session.as_mut().map(|session| {
                match session.recorders.iter().find(|(d, _)| *d == layer) {
                    Some((_, r)) => Arc::clone(r),
                    None => {
                        let r = Arc::new(AccessRecorder::with_origin(
                            session.origin,
                            self.settings.max_files,
                        ));
                        session.recorders.push((layer, Arc::clone(&r)));
                        r
                    }
                }
            });
            let prefetch = match &state.profile {
                Some(profile) if state.prefetched.insert(layer) => {
                    Some((Arc::clone(profile), Arc::clone(&state.budget)))
                }
                Some(_) => None,
                None => {
                    state.waiting.retain(|(_, f)| f.strong_count() > 0);
                    state.waiting.push((layer, Arc::downgrade(fetcher)));
                    None
                }
            };
            (recorder, prefetch)
        };
        if let Some((profile, budget)) = prefetch {
            self.spawn_prefetch(profile, layer, Arc::clone(fetcher), budget);
        }
        recorder
    }

    /// The last lazy mount of image `image` went away: a recording in progress
    /// ends now.
    pub(super) fn on_last_unmount(self: &Arc<Self>, image: Digest) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.finish_recording(image).await });
    }

    fn spawn_window_end(self: &Arc<Self>, image: Digest) {
        let this = Arc::clone(self);
        let window = self.settings.window;
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(window) => this.finish_recording(image).await,
                () = this.stop.cancelled() => {}
            }
        });
    }

    /// Ends the recording of `image` (if still in progress): merges the layers'
    /// first reads by time, keeps the profile and publishes it when configured.
    async fn finish_recording(self: &Arc<Self>, image: Digest) {
        let (session, repository, subject) = {
            let mut images = self.images.lock();
            let Some(state) = images.get_mut(&image) else {
                return;
            };
            let Some(session) = state.session.take() else {
                return;
            };
            (session, state.repository.clone(), state.subject.clone())
        };
        let mut accesses: Vec<(Duration, usize, ProfileEntry)> = Vec::new();
        for (layer, recorder) in &session.recorders {
            recorder.finish();
            for access in recorder.accesses() {
                if validate_path(&access.path).is_err() {
                    continue;
                }
                let n = accesses.len();
                accesses.push((
                    access.at,
                    n,
                    ProfileEntry {
                        layer: *layer,
                        path: access.path,
                        ms: Some(access.at.as_millis().min(u128::from(u64::MAX)) as u64),
                    },
                ));
            }
        }
        accesses.sort_by_key(|(at, n, _)| (*at, *n));
        let entries: Vec<ProfileEntry> = accesses
            .into_iter()
            .map(|(_, _, e)| e)
            .take(self.settings.max_files)
            .collect();
        if entries.is_empty() {
            tracing::debug!(%image, "no file read while recording; no start-up profile");
            return;
        }
        let profile = match StartupProfile::new(image, entries) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(%image, error = %e, "recorded start-up profile is not valid; dropped");
                return;
            }
        };
        self.store.save(&profile).await;
        bump(&self.counters.recorded, 1);
        tracing::info!(%image, files = profile.len(), "start-up profile recorded");
        if let Some(state) = self.images.lock().get_mut(&image) {
            if state.profile.is_none() {
                state.profile = Some(Arc::clone(&profile));
                // Mounted layers read what they needed already.
                state
                    .prefetched
                    .extend(state.waiting.drain(..).map(|(d, _)| d));
            }
        }
        if self.settings.publish {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                tokio::select! {
                    () = this.publish(&repository, &subject, &profile) => {}
                    () = this.stop.cancelled() => {}
                }
            });
        }
    }

    async fn publish(
        &self,
        repository: &Repository,
        subject: &Descriptor,
        profile: &StartupProfile,
    ) {
        match push_profile(&self.client, repository, subject, profile).await {
            Ok(desc) => {
                bump(&self.counters.published, 1);
                tracing::info!(image = %subject.digest, %repository, referrer = %desc.digest, "start-up profile published beside the image");
            }
            Err(e) => {
                bump(&self.counters.publish_failures, 1);
                let denied = e.kind() == ErrorKind::Denied;
                if denied && !self.refused.lock().insert(repository.clone()) {
                    tracing::debug!(%repository, error = %e, "start-up profile not published");
                } else {
                    tracing::warn!(%repository, image = %subject.digest, error = %e, "cannot publish the start-up profile (profiles.publish); containers are not affected");
                }
            }
        }
    }

    fn spawn_lookup(self: &Arc<Self>, image: Digest, repository: Repository) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                () = this.lookup(image, repository) => {}
                () = this.stop.cancelled() => {}
            }
        });
    }

    async fn lookup(self: &Arc<Self>, image: Digest, repository: Repository) {
        let profile = match fetch_profile(&self.client, &repository, image).await {
            Ok(Some(p)) => Arc::new(p),
            Ok(None) => {
                tracing::debug!(%image, %repository, "no start-up profile in the repository");
                return;
            }
            Err(e) => {
                bump(&self.counters.fetch_failures, 1);
                tracing::info!(%image, %repository, error = %e, "cannot fetch a start-up profile; starting without one");
                return;
            }
        };
        bump(&self.counters.fetched_registry, 1);
        tracing::info!(%image, %repository, files = profile.len(), "start-up profile fetched from the repository");
        self.store.save(&profile).await;
        let (waiting, budget) = {
            let mut images = self.images.lock();
            let Some(state) = images.get_mut(&image) else {
                return;
            };
            if state.profile.is_some() {
                return;
            }
            // The image has a profile: no need to record another.
            if let Some(session) = state.session.take() {
                for (_, recorder) in &session.recorders {
                    recorder.finish();
                }
            }
            state.profile = Some(Arc::clone(&profile));
            let waiting: Vec<(Digest, Arc<Fetcher>)> = state
                .waiting
                .drain(..)
                .filter_map(|(d, f)| Some((d, f.upgrade()?)))
                .collect();
            let waiting: Vec<_> = waiting
                .into_iter()
                .filter(|(d, _)| state.prefetched.insert(*d))
                .collect();
            (waiting, Arc::clone(&state.budget))
        };
        for (layer, fetcher) in waiting {
            self.spawn_prefetch(Arc::clone(&profile), layer, fetcher, Arc::clone(&budget));
        }
    }

    fn spawn_prefetch(
        self: &Arc<Self>,
        profile: Arc<StartupProfile>,
        layer: Digest,
        fetcher: Arc<Fetcher>,
        budget: Arc<AtomicU64>,
    ) {
        if !self.settings.prefetch {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let work = async {
                let index = Arc::clone(fetcher.index());
                let files: Vec<_> = profile
                    .paths_in_layer(&layer)
                    .filter_map(|p| index.resolve_path(p))
                    .filter(|id| index.entry(*id).kind() == EntryKind::Reg)
                    .collect();
                if files.is_empty() {
                    return;
                }
                let wanted = files
                    .iter()
                    .flat_map(|id| index.entry(*id).chunks())
                    .map(|c| u64::from(c.compressed_len))
                    .fold(0u64, u64::saturating_add);
                // Reserve this layer's share of the image's budget up front, so
                // that layers prefetched at once never exceed it together.
                let granted = budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        Some(left - left.min(wanted))
                    })
                    .map_or(0, |left| left.min(wanted));
                if granted == 0 {
                    return;
                }
                fetcher.set_profile_guided();
                let t = Instant::now();
                let bytes = fetcher.fetch_files(&files, granted).await;
                bump(&this.counters.prefetched_bytes, bytes);
                tracing::info!(
                    %layer,
                    image = %profile.image(),
                    files = files.len(),
                    bytes,
                    ms = t.elapsed().as_millis() as u64,
                    "start-up profile prefetch done"
                );
            };
            tokio::select! {
                () = work => {}
                () = this.stop.cancelled() => {}
            }
        });
    }
}

/// Pushes `profile` to `repository` as an artifact whose subject is the image
/// manifest `subject`: the profile blob, the empty config, the manifest, and the
/// referrers tag-schema index where the registry has no referrers API.
pub async fn push_profile(
    client: &RegistryClient,
    repository: &Repository,
    subject: &Descriptor,
    profile: &StartupProfile,
) -> Result<Descriptor, RegistryError> {
    let blob = bytes::Bytes::from(profile.encode());
    client.push_blob_bytes(repository, blob.clone()).await?;
    client
        .push_blob_bytes(repository, bytes::Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let profile_blob = Descriptor::for_bytes(PROFILE_MEDIA_TYPE, &blob);
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(
        ANNOTATION_PROFILE_DIGEST.to_owned(),
        profile_blob.digest.to_string(),
    );
    annotations.insert(
        ANNOTATION_PROFILE_SIZE.to_owned(),
        profile_blob.size.to_string(),
    );
    annotations.insert(
        ANNOTATION_CREATED.to_owned(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    annotations.insert(
        ANNOTATION_ZEST_VERSION.to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    );
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_owned()),
        artifact_type: Some(PROFILE_MEDIA_TYPE.to_owned()),
        config: Descriptor::for_bytes(EMPTY_CONFIG_MEDIA_TYPE, EMPTY_CONFIG),
        layers: vec![profile_blob],
        subject: Some(Descriptor::new(
            subject.media_type.clone(),
            subject.digest,
            subject.size,
        )),
        annotations,
        extra: serde_json::Map::new(),
    };
    let (desc, _) = client.push_referrer(repository, &manifest).await?;
    Ok(desc)
}

/// The newest start-up profile of image manifest `image` in `repository`, if
/// any: found through the referrers API or the tag schema, its manifest and blob
/// fetched by digest (verified, size-capped), validated, and checked to name
/// `image`.
pub async fn fetch_profile(
    client: &RegistryClient,
    repository: &Repository,
    image: Digest,
) -> Result<Option<StartupProfile>, ProfileFetchError> {
    let (mut found, _) = client
        .list_referrers(repository, &image, PROFILE_MEDIA_TYPE)
        .await?;
    // Newest first by the created annotation (RFC 3339 UTC sorts as text);
    // undated ones last.
    found.sort_by(|a, b| {
        let created = |d: &Descriptor| d.annotations.get(ANNOTATION_CREATED).cloned();
        created(b).cmp(&created(a))
    });
    let Some(desc) = found.into_iter().next() else {
        return Ok(None);
    };
    let (blob, size) = match profile_blob_named_by(&desc).map_err(ProfileFetchError::Invalid)? {
        Some(named) => named,
        None => profile_blob_of_manifest(client, repository, &desc, image).await?,
    };
    if size > MAX_PROFILE_BYTES {
        return Err(ProfileFetchError::Invalid(format!(
            "profile blob {blob} is {size} bytes, more than the {MAX_PROFILE_BYTES}-byte limit"
        )));
    }
    let bytes = client.get_blob_bytes(repository, &blob, size).await?;
    let profile = StartupProfile::decode(&bytes)?;
    profile.check_image(image)?;
    Ok(Some(profile))
}

/// The profile blob the artifact manifest of referrer `desc` names, after
/// checking that it is a profile of `image`.
async fn profile_blob_of_manifest(
    client: &RegistryClient,
    repository: &Repository,
    desc: &Descriptor,
    image: Digest,
) -> Result<(Digest, u64), ProfileFetchError> {
    let fetched = client.get_manifest_by_descriptor(repository, desc).await?;
    let manifest = ImageManifest::from_json(&fetched.bytes).map_err(|e| {
        ProfileFetchError::Invalid(format!(
            "referrer {}: not an image manifest: {e}",
            desc.digest
        ))
    })?;
    if manifest.artifact_type.as_deref() != Some(PROFILE_MEDIA_TYPE) {
        return Err(ProfileFetchError::Invalid(format!(
            "referrer {} has artifact type {:?}, not {PROFILE_MEDIA_TYPE}",
            desc.digest, manifest.artifact_type
        )));
    }
    if manifest.subject.as_ref().map(|s| s.digest) != Some(image) {
        return Err(ProfileFetchError::Invalid(format!(
            "referrer {} does not name image manifest {image} as its subject",
            desc.digest
        )));
    }
    let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| l.media_type == PROFILE_MEDIA_TYPE)
    else {
        return Err(ProfileFetchError::Invalid(format!(
            "referrer {} has no {PROFILE_MEDIA_TYPE} layer",
            desc.digest
        )));
    };
    Ok((layer.digest, layer.size))
}

/// The profile blob a referrer's descriptor names in its annotations (profiles
/// published before they were added have none: their manifest names it).
/// Errors are messages for [`ProfileFetchError::Invalid`].
fn profile_blob_named_by(desc: &Descriptor) -> Result<Option<(Digest, u64)>, String> {
    let (Some(digest), Some(size)) = (
        desc.annotations.get(ANNOTATION_PROFILE_DIGEST),
        desc.annotations.get(ANNOTATION_PROFILE_SIZE),
    ) else {
        return Ok(None);
    };
    let invalid = |what: &str| format!("referrer {}: annotation {what} is not valid", desc.digest);
    let digest: Digest = digest
        .parse()
        .map_err(|_| invalid(ANNOTATION_PROFILE_DIGEST))?;
    let size: u64 = size.parse().map_err(|_| invalid(ANNOTATION_PROFILE_SIZE))?;
    Ok(Some((digest, size)))
}

/// Why a profile could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ProfileFetchError {
    /// The registry failed or served something that does not verify.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The profile document is refused.
    #[error(transparent)]
    Profile(#[from] zest_format::profile::ProfileError),
    /// The artifact is not a profile of this image.
    #[error("{0}")]
    Invalid(String),
}
