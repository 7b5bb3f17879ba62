//! Library prefetch: when a program starts, fetch the shared objects it will
//! load, all at once, instead of letting the dynamic loader find them missing
//! one after another.
//!
//! Without a start-up profile, every shared library costs a cold start two
//! blocking round trips or more, in series: the loader reads its ELF header,
//! then maps and relocates its data segment, and only then goes on to the next
//! library (a postgres start loads about 25 this way). Which libraries a
//! program loads is written in the program: its `DT_NEEDED` entries, resolved
//! like the loader does (`DT_RUNPATH`/`DT_RPATH` with `$ORIGIN`, then the
//! multiarch and standard library directories). So when the first read of a
//! file at offset 0 returns an ELF header ([`LibraryStack::file_start`], called
//! by the filesystem), a background task reads the file's program headers and
//! dynamic section, finds each needed library in the image's layers (this
//! layer first, then the layers below it, following symbolic links across
//! layers), and fetches, for every library at once, the parts the loader
//! touches first: the headers and read-only metadata segment, the writable
//! (relocated) segments and the dynamic section, or the whole file when it is
//! small, the writable segments in a request of their own (the loader
//! relocates them before any code runs). Each library is then examined the
//! same way, so a dependency tree is fetched in as many round trips as it is
//! deep, not as it has libraries. The names of the libraries are taken from
//! the start of the file when its dynamic string table is there (most
//! programs'), so the next level does not wait for the dynamic section, a
//! round trip later; the dynamic section then confirms them and adds the
//! rest. The program interpreter (`PT_INTERP`, the loader itself) is fetched
//! the same way.
//!
//! The image's own start command is known before it runs: when the image's
//! top layer is mounted, the daemon hands the config's Entrypoint and Cmd to
//! [`LibraryStack::prefetch_start`], which finds the program like `execvp`
//! does (PATH, or the working directory), follows `#!` interpreter lines
//! (`/usr/bin/env NAME` included), and examines the program as above; it also
//! fetches the few files nearly every start reads before the program's own
//! (the runtime's user and group lookup, the loader's cache, and what the C
//! library reads for the locale and time zone the config's environment names:
//! each a blocking round trip otherwise, one after another). The command a
//! container's process actually runs (another than the image's, or one a
//! start script runs) is prefetched the same way when the process first
//! asks a layer for something ([`process`]).
//!
//! Interpreters and compilers read files whose names come from other files the
//! same way: Python modules ([`LibraryStack::file_start`] on a `.py` or `.pyc`
//! file, see `examine_module`) and C and C++ headers ([`includes`]) are found
//! and fetched ahead of their reader, each scanned as soon as it arrives
//! ([`walk`]), as guesses that stand down where a start-up profile guides the
//! layer; a start script that imports many modules of one directory, or a
//! small package, has the rest of it fetched in one stream
//! (`fetch_module_dirs`). So are the data files a starting program names in
//! its read-only data ([`named`]).
//!
//! Invariants: this is advice, never on a read's path: it runs in tasks of the
//! fetcher's runtime, and every byte it causes to be fetched is verified like
//! any other (it goes through [`Fetcher::fetch_file_parts`], at the priority of
//! the reads it anticipates). Bounded: each file is examined once per layer
//! ([`MAX_TRACKED_FILES`], then forgotten), the dependency depth is bounded
//! ([`MAX_DEPTH`]), and each stack (one mount) fetches at most its byte budget
//! ([`LibraryPrefetch::new`]), so a tool that reads many ELF files without
//! running them (a scanner, `cp -r`) costs at most that. Hostile ELF files get
//! [`zest_format::elf`]'s checks: a malformed file is skipped.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;

use super::estimate::LinkEstimate;
use super::speculate::PROGRAM_TAIL_BYTES;
use super::Fetcher;
use zest_format::c_include::{self, CFile};
use zest_format::elf::{multiarch_triplet, string_at, ElfError, ElfFile};
use zest_format::python::{self, ImportContext, ModuleFile};

mod includes;
mod named;
pub mod process;
mod walk;
use walk::Guess;
use zest_format::{Chunk, EntryId, EntryKind};
use zest_oci::digest::Digest;

/// Files remembered as examined (per daemon); past this many the set is reset.
pub const MAX_TRACKED_FILES: usize = 1 << 16;

/// Deepest chain of libraries followed from the program that was read.
pub const MAX_DEPTH: u32 = 8;

/// Bytes read at the head of a library before its program headers are known.
const HEAD_BYTES: u64 = 4096;

/// Bytes at the start of an ELF file looked at for library names before
/// its dynamic section is read ([`LibraryStack::early_needed`]): the
/// dynamic string table of most programs lies there.
const EARLY_NAMES_BYTES: u64 = 128 << 10;

/// Library names taken from one file's start, at most.
const MAX_EARLY_NAMES: usize = 64;

/// Largest program-header table read (a real one is under 1 KiB).
const MAX_HEADERS_BYTES: u64 = 64 << 10;

/// Largest dynamic section read.
const MAX_DYNAMIC_BYTES: u64 = 64 << 10;

/// Most bytes of one segment fetched: the start of a huge read-only segment
/// holds what the loader reads first (hash tables, symbols, relocations).
const MAX_SEGMENT_BYTES: u64 = 4 << 20;

/// Code segments up to this size are fetched with the rest: a start faults in
/// pages all over the code of the program and its C library, one round trip
/// each, and code this small (the C library's, the python interpreter's)
/// costs less than a few of those, on any link (measured at 200 Mbit/s and
/// 20 ms: 2 MiB -> 4 MiB, 3-7 % faster starts, the same bytes: the start
/// reads that code anyway).
const MAX_CODE_BYTES: u64 = 4 << 20;

/// Larger code is fetched whole when it compresses to at most this many
/// bandwidth-delay products of the link to the registry (once measured; at
/// the link's peak rate, not a request's share of it): its transfer
/// then takes as long as this many round trips, about as many places as a
/// start faults in of a library's code (measured: `libcrypto` at `import
/// ssl`, seven). Huge code (`libnode`, `cc1`) stays left to demand.
const CODE_BDPS: u64 = 8;

/// Most compressed bytes of one code segment fetched whole, however fast
/// the link.
const MAX_CODE_FETCH_BYTES: u64 = 8 << 20;

/// Files whose chunks compress to at most this are fetched whole.
const WHOLE_FILE_BYTES: u64 = 256 << 10;

/// Symbolic links followed while resolving one path.
const MAX_LINK_HOPS: usize = 16;

/// Bytes read for one library name or search path.
const NAME_READ_BYTES: u32 = 512;

/// Files read at nearly every container start before its program runs: the
/// runtime's user and group lookup, the name service configuration, the
/// loader's cache, the C library's time zone.
const START_FILES: [&str; 5] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.cache",
    "/etc/localtime",
];

/// The locale categories: each is named by an environment variable of its
/// own (after `LC_ALL`, before `LANG`) and loaded from a file of that name in
/// the locale's directory (`LC_MESSAGES` from `LC_MESSAGES/SYS_LC_MESSAGES`)
/// when there is no locale archive.
const LOCALE_CATEGORIES: [&str; 12] = [
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_COLLATE",
    "LC_MONETARY",
    "LC_MESSAGES",
    "LC_PAPER",
    "LC_NAME",
    "LC_ADDRESS",
    "LC_TELEPHONE",
    "LC_MEASUREMENT",
    "LC_IDENTIFICATION",
];

/// Directories holding the C library's character set conversion modules and
/// their cache, read once a locale with a multibyte character set is set:
/// Debian's multiarch directories, then the others' `lib64` and `lib`.
const GCONV_DIRS: [&str; 9] = [
    "/usr/lib/x86_64-linux-gnu/gconv",
    "/usr/lib/aarch64-linux-gnu/gconv",
    "/usr/lib/arm-linux-gnueabihf/gconv",
    "/usr/lib/powerpc64le-linux-gnu/gconv",
    "/usr/lib/s390x-linux-gnu/gconv",
    "/usr/lib/riscv64-linux-gnu/gconv",
    "/usr/lib/i386-linux-gnu/gconv",
    "/usr/lib64/gconv",
    "/usr/lib/gconv",
];

/// Compressed bytes of Python modules one stack fetches ahead of their
/// imports, at most (a scan's candidates include attribute names that match a
/// module's: this bounds what such guesses cost).
const MAX_PYTHON_BYTES: u64 = 16 << 20;

/// Levels of imports fetched ahead of the module read. The last level's
/// modules are fetched, not scanned: the interpreter's read of one carries on
/// from there, so the guesses follow the imports that happen, not every name
/// of every module reachable (measured with 8 levels: python-print kept
/// fetching modules it never imports for half a second after it was done).
const MAX_PYTHON_DEPTH: u32 = 3;

/// A module an import walk scans: its kind, where its imports are looked
/// for, and whether it is a start script (whose functions' imports run).
type ModuleWalked = (ModuleFile, ImportContext, bool);

/// Modules of one directory a start script's import walk names before it
/// fetches the rest of that directory's modules
/// ([`LibraryStack::fetch_module_dirs`]).
const DIR_MODULES_NAMED: usize = 8;

/// Module directories one scan's fetches keep in flight at once, the first
/// named first: all at once, they shared the link and the first arrived
/// last.
const MAX_DIR_FETCHES: usize = 2;

/// What a module directory's fetch may take at least, however slow (or
/// unmeasured) the link.
const MIN_MODULE_DIR_BYTES: u64 = 1 << 20;

/// What a package's fetch, when a start script's walk names its
/// `__init__`, may take at least (else: one bandwidth-delay product).
const MIN_PACKAGE_BYTES: u64 = 256 << 10;

/// What a start script's walk knows of one directory: modules named so far,
/// and whether the directory was fetched whole.
#[derive(Default)]
struct DirNamed {
    count: usize,
    fetched: bool,
}

/// Bytes of a Python module scanned for its imports.
const PYTHON_SCAN_BYTES: u64 = 256 << 10;

/// Modules of its own package one module may name before its names are taken
/// for a table rather than imports (a package's `__init__` imports a few
/// dozen submodules at most).
const MAX_RELATIVE_MODULES: usize = 32;

/// Directories one Python examination looks names up in, at most.
const MAX_PYTHON_DIRS: usize = 1024;

/// Entries of one directory looked at for extension modules.
const MAX_DIR_ENTRIES: usize = 4096;

/// Distinct locales of an environment looked at (an image config is untrusted
/// input).
const MAX_LOCALES: usize = 2;

/// Longest locale or time zone name taken from an environment.
const MAX_ENV_NAME: usize = 64;

/// `#!` lines followed from a start command to its interpreter.
const MAX_SCRIPT_HOPS: usize = 4;

/// PATH directories looked in for a start command (an image config is
/// untrusted input: its PATH bounds no work by itself).
const MAX_PATH_DIRS: usize = 64;

/// What an image starts (its config's Entrypoint followed by Cmd), and where
/// the program is looked up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartCommand {
    /// Entrypoint then Cmd.
    pub argv: Vec<String>,
    /// The PATH of the config's environment (colon separated).
    pub path: String,
    /// The config's working directory (absolute).
    pub working_dir: String,
    /// The config's environment: its locale and time zone variables name
    /// files the C library reads at start ([`start_files`]).
    pub env: Vec<(String, String)>,
}

/// The files a start reads before its program's own, by absolute path: those
/// of [`START_FILES`], and those `env` (an image config's environment) names
/// through the C library: each locale's category files (in the directory
/// named as given and as the library normalizes it, `C.UTF-8` also as
/// `C.utf8`), the locale archive and aliases, the character set conversion
/// cache, and the time zone of `TZ`. Bounded whatever `env` holds.
pub fn start_files(env: &[(String, String)]) -> Vec<String> {
    let mut files: Vec<String> = START_FILES.iter().map(|f| (*f).to_owned()).collect();
    let value = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // LC_ALL, when set, is the locale of every category; otherwise each
    // category's own variable, then LANG.
    let variables: Vec<&str> = match value("LC_ALL") {
        Some(v) if !v.is_empty() => vec!["LC_ALL"],
        _ => LOCALE_CATEGORIES.into_iter().chain(["LANG"]).collect(),
    };
    let mut locales: Vec<String> = Vec::new();
    for var in variables {
        let Some(name) = value(var).filter(|v| is_locale_name(v)) else {
            continue;
        };
        for dir in std::iter::once(name.to_owned()).chain(normalized_locale(name)) {
            if !locales.contains(&dir) && locales.len() < MAX_LOCALES * 2 {
                locales.push(dir);
            }
        }
    }
    if !locales.is_empty() {
        files.push("/usr/lib/locale/locale-archive".to_owned());
        files.push("/usr/share/locale/locale.alias".to_owned());
        for dir in &locales {
            for category in LOCALE_CATEGORIES {
                let file = if category == "LC_MESSAGES" {
                    "LC_MESSAGES/SYS_LC_MESSAGES"
                } else {
                    category
                };
                files.push(format!("/usr/lib/locale/{dir}/{file}"));
            }
        }
        for dir in GCONV_DIRS {
            files.push(format!("{dir}/gconv-modules.cache"));
        }
    }
    if let Some(tz) = value("TZ").map(|v| v.strip_prefix(':').unwrap_or(v)) {
        let plain = tz.len() <= MAX_ENV_NAME
            && !tz.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            && tz
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+-/".contains(&b));
        if plain {
            files.push(format!("/usr/share/zoneinfo/{tz}"));
        } else if tz.starts_with('/') && tz.len() <= MAX_ENV_NAME {
            files.push(tz.to_owned());
        }
    }
    files
}

/// Whether `name` names a locale whose files the C library reads (not the
/// built-in `C` and `POSIX`, not a path).
fn is_locale_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ENV_NAME
        && name != "C"
        && name != "POSIX"
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// The locale directory name the C library also tries for `name`: its
/// character set normalized (lower case, letters and digits only, `iso` before
/// one that is all digits), when that differs.
fn normalized_locale(name: &str) -> Option<String> {
    let (head, rest) = name.split_once('.')?;
    let (codeset, modifier) = match rest.split_once('@') {
        Some((c, m)) => (c, Some(m)),
        None => (rest, None),
    };
    let mut norm: String = codeset
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if !norm.is_empty() && norm.bytes().all(|b| b.is_ascii_digit()) {
        norm.insert_str(0, "iso");
    }
    let mut out = format!("{head}.{norm}");
    if let Some(m) = modifier {
        out.push('@');
        out.push_str(m);
    }
    (out != name).then_some(out)
}

/// State shared by every stack of a daemon: the files already examined and
/// counters.
#[derive(Debug)]
pub struct LibraryPrefetch {
    examined: Mutex<HashSet<(Digest, EntryId)>>,
    max_bytes_per_stack: u64,
    elf_files: AtomicU64,
    libraries: AtomicU64,
    bytes: AtomicU64,
    python_modules: AtomicU64,
    headers: AtomicU64,
    process_commands: AtomicU64,
    /// The stacks of the mounted layers, by mount directory.
    pub mounts: process::MountStacks,
    processes: process::ProcessWatch,
}

/// Counters of a [`LibraryPrefetch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LibraryPrefetchStats {
    /// ELF files examined (programs read at offset 0, and the libraries they
    /// need).
    pub elf_files: u64,
    /// Needed libraries found in the layers.
    pub libraries: u64,
    /// Compressed bytes fetched for them (and for Python modules and headers).
    pub bytes: u64,
    /// Python modules fetched ahead of the import that reads them.
    pub python_modules: u64,
    /// C and C++ headers fetched ahead of the compiler's read.
    pub headers: u64,
    /// Commands of processes in containers prefetched when they started
    /// (each command once per image; the image's own start command not
    /// counted).
    pub processes: u64,
}

/// One layer a stack looks in.
#[derive(Clone, Debug)]
pub struct StackLayer {
    /// The layer's blob digest (names the layer in the examined set).
    pub digest: Digest,
    /// Its fetcher; a layer that went away is skipped.
    pub fetcher: Weak<Fetcher>,
}

/// The layers the programs of one mounted layer can load libraries from: that
/// layer first, then the layers below it, top to bottom.
#[derive(Debug)]
pub struct LibraryStack {
    shared: Arc<LibraryPrefetch>,
    layers: Vec<StackLayer>,
    spent: AtomicU64,
    python_spent: AtomicU64,
    include_spent: AtomicU64,
    named_spent: AtomicU64,
    search_path: std::sync::OnceLock<includes::SearchPath>,
    names: tokio::sync::OnceCell<Arc<named::NameIndex>>,
    handled: process::Handled,
}

impl LibraryPrefetch {
    /// Shared state; each stack fetches at most `max_bytes_per_stack`
    /// compressed bytes.
    pub fn new(max_bytes_per_stack: u64) -> Arc<LibraryPrefetch> {
        Arc::new(LibraryPrefetch {
            examined: Mutex::new(HashSet::new()),
            max_bytes_per_stack,
            elf_files: AtomicU64::new(0),
            libraries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            python_modules: AtomicU64::new(0),
            headers: AtomicU64::new(0),
            process_commands: AtomicU64::new(0),
            mounts: process::MountStacks::default(),
            processes: process::ProcessWatch::default(),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> LibraryPrefetchStats {
        LibraryPrefetchStats {
            elf_files: self.elf_files.load(Ordering::Relaxed),
            libraries: self.libraries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            python_modules: self.python_modules.load(Ordering::Relaxed),
            headers: self.headers.load(Ordering::Relaxed),
            processes: self.process_commands.load(Ordering::Relaxed),
        }
    }

    /// Marks file `id` of layer `digest` examined; false when it already was.
    fn first_time(&self, digest: Digest, id: EntryId) -> bool {
        let mut set = self.examined.lock();
        if set.len() >= MAX_TRACKED_FILES {
            set.clear();
        }
        set.insert((digest, id))
    }
}

/// A file found in a stack: the layer's position and the entry.
type Found = (usize, EntryId);

/// Bytes of a file of one layer: the entry and a range of its contents.
type FilePart = (EntryId, Range<u64>);

/// What kind of file a read from offset 0 started.
enum Started {
    Elf,
    Module(ModuleFile),
    C(CFile),
}

/// A directory as a stack shows it (see [`LibraryStack::dir_view`]).
#[derive(Default)]
struct DirView {
    /// The directory in each layer that has it, top first.
    layers: Vec<(usize, EntryId)>,
    /// Extension modules by module name.
    extensions: HashMap<String, Found>,
}

impl LibraryStack {
    /// A stack over `layers` (the mounted layer first), sharing `shared`.
    pub fn new(shared: Arc<LibraryPrefetch>, layers: Vec<StackLayer>) -> Arc<LibraryStack> {
        Arc::new(LibraryStack {
            shared,
            layers,
            spent: AtomicU64::new(0),
            python_spent: AtomicU64::new(0),
            include_spent: AtomicU64::new(0),
            named_spent: AtomicU64::new(0),
            search_path: std::sync::OnceLock::new(),
            names: tokio::sync::OnceCell::new(),
            handled: process::Handled::default(),
        })
    }

    /// A read at offset 0 of file `id` of the stack's first layer returned
    /// `head`. When that is an ELF file, a Python module or a C or C++ file
    /// not examined yet, starts examining it in the background; otherwise
    /// costs a comparison of four bytes and a look at a name's end.
    pub fn file_start(self: &Arc<Self>, id: EntryId, head: &[u8]) {
        self.examine_started((0, id), head);
    }

    /// Starts examining file `found`, whose first bytes are `head`, when it is
    /// an ELF file, a Python module or a C or C++ file not examined yet.
    fn examine_started(self: &Arc<Self>, (pos, id): Found, head: &[u8]) {
        let Some(layer) = self.layers.get(pos) else {
            return;
        };
        let Some(fetcher) = layer.fetcher.upgrade() else {
            return;
        };
        let found_kind = if ElfFile::has_magic(head) {
            Started::Elf
        } else {
            let entry = fetcher.index().entry(id);
            if entry.kind() != EntryKind::Reg {
                return;
            }
            if let Some(kind) = python::module_file(entry.name()) {
                Started::Module(kind)
            } else if let Some(kind) = c_include::c_file(entry.name(), || entry.path()) {
                Started::C(kind)
            } else {
                return;
            }
        };
        // Guesses stand down where a start-up profile says what is read.
        if !matches!(found_kind, Started::Elf) && self.profile_guided() {
            return;
        }
        if !self.shared.first_time(layer.digest, id) {
            return;
        }
        let this = Arc::clone(self);
        let head_of = |max: u64| Bytes::copy_from_slice(&head[..head.len().min(max as usize)]);
        let found = (pos, id);
        match found_kind {
            Started::Elf => {
                let head = head_of(MAX_HEADERS_BYTES);
                fetcher.spawn(async move { this.examine(found, Some(head), 0).await });
            }
            Started::Module(kind) => {
                let head = head_of(PYTHON_SCAN_BYTES);
                fetcher.spawn(async move { this.examine_module(found, kind, head).await });
            }
            Started::C(kind) => {
                let head = head_of(includes::INCLUDE_SCAN_BYTES);
                fetcher.spawn(async move { this.examine_includes(found, kind, head).await });
            }
        }
    }

    /// Examines Python module `found` (its first bytes `data`) and what it
    /// imports: the module files the names it uses resolve to in the stack
    /// are fetched at once (so neighbours share requests), each scanned in
    /// turn as it arrives, up to [`MAX_PYTHON_DEPTH`] levels (the last
    /// fetched, not scanned) and [`MAX_PYTHON_BYTES`] ([`walk`]). Extension
    /// modules found on the way are examined as ELF files (their libraries
    /// are fetched too). A name is looked up in each candidate directory (a
    /// binary search per layer) before any path is built: most names a scan
    /// yields are not modules.
    async fn examine_module(self: Arc<Self>, found: Found, kind: ModuleFile, data: Bytes) {
        let Some(fetcher) = self.fetcher(found.0) else {
            return;
        };
        let path = format!("/{}", fetcher.index().entry(found.1).path());
        // A start script's functions are its program (`main()`): their
        // imports happen, and are walked like the module's own.
        let (context, script) = match ImportContext::of(&path) {
            Some(c) => (c, false),
            None if kind == ModuleFile::Source => match self.script_context(&path) {
                Some(c) => (c, true),
                None => return,
            },
            None => return,
        };
        self.walk_imports(&path, kind, context, script, data).await;
    }

    /// What the interpreter at `path` (a Python 3 program, by its name)
    /// imports before any script of its own: its start-up modules, found in
    /// the standard library of its version that the stack holds, and what
    /// they import, fetched as a script importing them would have them.
    /// Every Python start reads them one after another, a blocking round
    /// trip each, before the first line of a script runs.
    fn python_start(self: &Arc<Self>, path: &str) {
        let name = path.rsplit('/').next().unwrap_or(path);
        let version = match name.strip_prefix("python3") {
            Some("") => None,
            Some(minor) => match minor.strip_prefix('.').and_then(|m| m.parse::<u32>().ok()) {
                Some(v) if python::VERSIONS.contains(&v) => Some(v),
                _ => return,
            },
            None => return,
        };
        let local = path.starts_with("usr/local/");
        let prefixes = if local {
            ["/usr/local/lib", "/usr/lib"]
        } else {
            ["/usr/lib", "/usr/local/lib"]
        };
        let versions: Vec<u32> = match version {
            Some(v) => vec![v],
            None => python::VERSIONS.rev().collect(),
        };
        let Some((library, version)) = versions.iter().find_map(|&v| {
            prefixes.iter().find_map(|prefix| {
                let library = format!("{prefix}/python3.{v}");
                self.resolve(&format!("{library}/os.py"))
                    .map(|_| (library, v))
            })
        }) else {
            return;
        };
        let Some(context) = ImportContext::of(&format!("{library}/os.py")) else {
            return;
        };
        let Some(fetcher) = self.fetcher(0) else {
            return;
        };
        let this = Arc::clone(self);
        let imports = Bytes::from(python::startup_imports(version));
        fetcher.spawn(async move {
            this.walk_imports(&library, ModuleFile::Source, context, false, imports)
                .await;
        });
    }

    /// Walks the imports of module `data` (of `kind`, in `context`; shown
    /// as `path`; its functions' imports walked too when it is a `script`):
    /// see [`LibraryStack::examine_module`].
    async fn walk_imports(
        self: &Arc<Self>,
        path: &str,
        kind: ModuleFile,
        context: ImportContext,
        script: bool,
        data: Bytes,
    ) {
        let mut views: HashMap<String, DirView> = HashMap::new();
        let guess = Guess {
            spent: &self.python_spent,
            max: MAX_PYTHON_BYTES,
            files: &self.shared.python_modules,
        };
        // Modules a start script's walk named per directory.
        let mut per_dir: HashMap<(usize, EntryId), DirNamed> = HashMap::new();
        let walked = self
            .walk(
                ((kind, context, script), data),
                MAX_PYTHON_DEPTH,
                PYTHON_SCAN_BYTES,
                guess,
                |(kind, context, functions_run), data, last| {
                    let named = self.imported_modules(
                        &mut views,
                        *kind,
                        data,
                        context,
                        *functions_run,
                        last,
                    );
                    if script {
                        self.fetch_module_dirs(&mut per_dir, &named);
                    }
                    named
                },
            )
            .await;
        tracing::debug!(
            module = path,
            scanned = walked.scanned,
            fetched = walked.fetched,
            "Python imports prefetched"
        );
    }

    /// Counts the modules a start script's import walk `named` per
    /// directory (in `per_dir`) and fetches whole directories of modules
    /// (the other small module files of the named one's kind, in name
    /// order): a directory once it reaches [`DIR_MODULES_NAMED`], up to
    /// [`code_budget`]; a package at once when its `__init__` is named and
    /// all of it fits one bandwidth-delay product (a larger one is imported
    /// in part, and left to the walk). At most [`MAX_DIR_FETCHES`] at a
    /// time, the directory named first first.
    ///
    /// Why: an interpreter goes depth first, and each level of an import
    /// chain (`argparse` imports `re`, which imports `enum`, which imports
    /// `types`, ...) is a round trip the walk cannot save, as the
    /// interpreter reaches each module no later than the walk learns its
    /// name. A script that names many modules of one library directory
    /// imports much of it through such chains (python-imports: 80 of the
    /// 171 modules of the standard library's top directory), and a package
    /// imported is mostly imported whole (`re`, `json`, `email.mime`); the
    /// whole directory in one stream costs less than the chains' round
    /// trips. Only for start scripts: the interpreter's own start-up imports
    /// (every Python start) stay as named.
    fn fetch_module_dirs(
        self: &Arc<Self>,
        per_dir: &mut HashMap<(usize, EntryId), DirNamed>,
        named: &[(Found, Option<ModuleWalked>)],
    ) {
        let mut batches: Vec<(usize, Arc<Fetcher>, Vec<FilePart>)> = Vec::new();
        for &((pos, id), _) in named {
            let Some(fetcher) = self.fetcher(pos) else {
                continue;
            };
            let index = fetcher.index();
            let entry = index.entry(id);
            let dir = entry.parent();
            if per_dir.len() >= MAX_PYTHON_DIRS && !per_dir.contains_key(&(pos, dir)) {
                continue;
            }
            let known = per_dir.entry((pos, dir)).or_default();
            known.count += 1;
            if known.fetched {
                continue;
            }
            // A package's `__init__` names its submodules in turn; a small
            // package is fetched whole at once.
            let package = entry.name().starts_with(b"__init__.");
            let link = fetcher.limits.estimate();
            let budget = if known.count == DIR_MODULES_NAMED {
                code_budget(link).max(MIN_MODULE_DIR_BYTES)
            } else if package {
                link.map_or(0, |l| l.link_bdp()).max(MIN_PACKAGE_BYTES)
            } else {
                continue;
            };
            // The same kind of module file: `.cpython-311.pyc` in a
            // `__pycache__`, `.py` in a source directory.
            let name = entry.name();
            let Some(dot) = name.iter().position(|&b| b == b'.') else {
                continue;
            };
            let suffix = &name[dot..];
            let mut taken = 0u64;
            let mut over = false;
            let mut parts: Vec<FilePart> = Vec::new();
            for child in index.children(dir).take(MAX_DIR_ENTRIES) {
                let e = index.entry(child.id);
                if e.kind() != EntryKind::Reg
                    || !child.name.ends_with(suffix)
                    || named.iter().any(|(f, _)| *f == (pos, child.id))
                {
                    continue;
                }
                let size = compressed_size(&fetcher, child.id);
                if size > WHOLE_FILE_BYTES || taken.saturating_add(size) > budget {
                    over = true;
                    continue;
                }
                taken += size;
                parts.push((child.id, 0..e.size()));
            }
            // A large package is imported in part: left to the walk (until
            // eight of its modules are named).
            if over && known.count < DIR_MODULES_NAMED {
                continue;
            }
            known.fetched = true;
            if parts.is_empty() {
                continue;
            }
            tracing::debug!(
                dir = %index.entry(dir).path(),
                files = parts.len(),
                bytes = taken,
                "Python module directory fetched"
            );
            // Ranked by the directory's first module named here: the
            // interpreter imports in that order.
            let rank = named
                .iter()
                .position(|&((p, i), _)| p == pos && index.entry(i).parent() == dir)
                .unwrap_or(0);
            batches.push((rank, Arc::clone(&fetcher), parts));
        }
        if batches.is_empty() {
            return;
        }
        batches.sort_by_key(|(rank, ..)| *rank);
        let this = Arc::clone(self);
        let spawner = Arc::clone(&batches[0].1);
        spawner.spawn(async move {
            // Counted as bytes, not as modules named by an import (the walk
            // may name some of them later).
            let unnamed = AtomicU64::new(0);
            let guess = Guess {
                spent: &this.python_spent,
                max: MAX_PYTHON_BYTES,
                files: &unnamed,
            };
            use futures::stream::StreamExt;
            futures::stream::iter(batches)
                .for_each_concurrent(MAX_DIR_FETCHES, |(_, layer, parts)| {
                    let (this, guess) = (&this, &guess);
                    async move { this.fetch_guessed(&layer, &parts, guess, None).await }
                })
                .await;
        });
    }

    /// The modules Python module `data` (of `kind`, in `context`) imports
    /// that are small enough to fetch whole and not examined yet (marked
    /// examined unless `last`), with their own kind and context; those its
    /// module-level code imports first. A module only a function imports is
    /// fetched, not scanned or marked (the function may never run: what it
    /// imports in turn is left to its own read), unless `functions_run` (a
    /// start script's). Directory views are kept in `views` across a walk.
    fn imported_modules(
        self: &Arc<Self>,
        views: &mut HashMap<String, DirView>,
        kind: ModuleFile,
        data: &Bytes,
        context: &ImportContext,
        functions_run: bool,
        last: bool,
    ) -> Vec<(Found, Option<ModuleWalked>)> {
        // (module, found in the module's own package, imported by a function).
        let mut candidates: Vec<((Found, ModuleFile, ImportContext), bool, bool)> = Vec::new();
        let mut imports = python::imported_names(kind, data);
        if functions_run {
            for import in &mut imports {
                import.in_function = false;
            }
        }
        // Stable: the module's own imports first, each group in its order.
        imports.sort_by_key(|i| i.in_function);
        for python::Import { name, in_function } in imports {
            let first = name.split('.').next().unwrap_or_default();
            for base in context.bases(&name) {
                if views.len() >= MAX_PYTHON_DIRS && !views.contains_key(base) {
                    continue;
                }
                let root = context.roots.first() == Some(base);
                let view = views
                    .entry(base.clone())
                    .or_insert_with(|| self.dir_view(base, root));
                if let Some(&ext) = view.extensions.get(first).filter(|_| first == name) {
                    // An extension module and its libraries: only for an
                    // import that happens.
                    if !in_function && self.first_time(ext) {
                        if let Some(f) = self.fetcher(ext.0) {
                            let this = Arc::clone(self);
                            f.spawn(async move { this.examine(ext, None, 1).await });
                        }
                    }
                    continue;
                }
                if !self.has_child(view, first) && !self.has_child(view, &format!("{first}.py")) {
                    continue;
                }
                let relative = *base == context.package_dir && !context.roots.contains(base);
                for group in context.files_under(base, &name) {
                    let Some((found, kind, path)) = group.iter().find_map(|p| {
                        let kind = python::module_file(p.as_bytes())?;
                        Some((self.resolve(p)?, kind, p))
                    }) else {
                        continue;
                    };
                    // A large module is left to the interpreter's read, and
                    // examined then.
                    if !self.small(found) || candidates.iter().any(|((f, ..), ..)| *f == found) {
                        continue;
                    }
                    if let Some(context) = ImportContext::of(path) {
                        candidates.push(((found, kind, context), relative, in_function));
                    }
                }
            }
        }
        // Many names of a module's own package are a table of them (the codec
        // names of `encodings.aliases`), not imports.
        if candidates
            .iter()
            .filter(|(_, relative, _)| *relative)
            .count()
            > MAX_RELATIVE_MODULES
        {
            candidates.retain(|(_, relative, _)| !relative);
        }
        // Each module once (one the interpreter read first was examined then).
        candidates
            .into_iter()
            .filter(|((found, ..), _, in_function)| {
                if last || *in_function {
                    !self.examined(*found)
                } else {
                    self.first_time(*found)
                }
            })
            .map(|((found, kind, context), _, in_function)| {
                // Only the walk's root is a start script.
                (found, (!in_function).then_some((kind, context, false)))
            })
            .collect()
    }

    /// Whether a start-up profile says what the start reads in some layer
    /// of the stack ([`Fetcher::profile_guided`]): then Python import
    /// prefetch, a guess, stands down (measured: with a profile it only
    /// added requests competing with the profile's).
    fn profile_guided(&self) -> bool {
        self.layers
            .iter()
            .filter_map(|l| l.fetcher.upgrade())
            .any(|f| f.profile_guided())
    }

    /// Whether `found` was examined already (without marking it).
    fn examined(&self, (pos, id): Found) -> bool {
        self.layers
            .get(pos)
            .is_some_and(|l| self.shared.examined.lock().contains(&(l.digest, id)))
    }

    /// Marks `found` examined; false when it already was.
    fn first_time(&self, (pos, id): Found) -> bool {
        self.layers
            .get(pos)
            .is_some_and(|l| self.shared.first_time(l.digest, id))
    }

    /// Directory `path` across the stack's layers (no symbolic links
    /// followed), with the extension modules in it (and, for a library's
    /// root, in its `lib-dynload`).
    fn dir_view(&self, path: &str, root: bool) -> DirView {
        let mut view = DirView::default();
        let dynload = format!("{path}/lib-dynload");
        let dirs = std::iter::once(path).chain(root.then_some(dynload.as_str()));
        for (n, dir) in dirs.enumerate() {
            for (pos, layer) in self.layers.iter().enumerate() {
                let Some(fetcher) = layer.fetcher.upgrade() else {
                    continue;
                };
                let index = fetcher.index();
                let Some(id) = index.resolve_path(dir.trim_start_matches('/')) else {
                    continue;
                };
                if index.entry(id).kind() != EntryKind::Dir {
                    continue;
                }
                if n == 0 {
                    view.layers.push((pos, id));
                }
                for child in index.children(id).take(MAX_DIR_ENTRIES) {
                    let Some(stem) = child
                        .name
                        .strip_suffix(b".so")
                        .and_then(|n| n.split(|&b| b == b'.').next())
                    else {
                        continue;
                    };
                    if index.entry(child.id).kind() == EntryKind::Reg {
                        let stem = String::from_utf8_lossy(stem).into_owned();
                        view.extensions.entry(stem).or_insert((pos, child.id));
                    }
                }
            }
        }
        view
    }

    /// Whether `name` is in directory `view` in some layer.
    fn has_child(&self, view: &DirView, name: &str) -> bool {
        view.layers.iter().any(|(pos, id)| {
            self.fetcher(*pos)
                .is_some_and(|f| f.index().lookup(*id, name.as_bytes()).is_some())
        })
    }

    /// The import context of a start script outside any Python library: the
    /// newest Python 3 library the stack holds.
    fn script_context(&self, script: &str) -> Option<ImportContext> {
        python::VERSIONS.rev().find_map(|version| {
            ["/usr/local/lib", "/usr/lib"]
                .into_iter()
                .find_map(|prefix| {
                    self.resolve(&format!("{prefix}/python3.{version}/os.py"))
                        .map(|_| ImportContext::for_script(script, prefix, version))
                })
        })
    }

    /// Examines ELF file `found`: fetches the parts the loader reads, then the
    /// libraries it needs (each examined in a task of its own).
    fn examine(
        self: Arc<Self>,
        found: Found,
        head: Option<Bytes>,
        depth: u32,
    ) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(why) = self.examine_inner(found, head, depth).await {
                tracing::trace!(
                    layer = found.0,
                    file = found.1.index(),
                    why,
                    "ELF file not examined"
                );
            }
        })
    }

    async fn examine_inner(
        self: &Arc<Self>,
        (pos, id): Found,
        head: Option<Bytes>,
        depth: u32,
    ) -> Result<(), &'static str> {
        let fetcher = self.fetcher(pos).ok_or("layer gone")?;
        let head = match head {
            Some(h) => h,
            None => self.head(&fetcher, id).await?,
        };
        let elf = match ElfFile::parse(&head) {
            Ok(elf) => elf,
            Err(ElfError::NeedMore(end)) if end <= MAX_HEADERS_BYTES => {
                let head = self.bytes(&fetcher, id, 0..end).await?;
                ElfFile::parse(&head).map_err(|_| "malformed ELF file")?
            }
            Err(_) => return Err("not a usable ELF file"),
        };
        self.shared.elf_files.fetch_add(1, Ordering::Relaxed);
        let path = fetcher.index().entry(id).path();
        if depth == 0 && !self.profile_guided() {
            self.python_start(&path);
            self.compiler_start(&path);
        }

        // Candidate paths, a group per library: the interpreter of the
        // program read first (the loader, which the kernel maps right after
        // the program), then each needed library.
        let mut groups: Vec<Vec<String>> = Vec::new();
        if depth == 0 {
            if let Some(interp) = elf.interp.clone().filter(|r| r.end - r.start <= 4096) {
                let bytes = self.bytes(&fetcher, id, interp).await?;
                if let Some(p) = string_at(&bytes, 0) {
                    groups.push(vec![String::from_utf8_lossy(p).into_owned()]);
                }
            }
        }

        // The parts of this file the loader touches first, in a task of their
        // own: the names of the libraries it needs (the dynamic section, a
        // few strings) are read meanwhile, so that finding them does not wait
        // for a large segment to arrive.
        let size = fetcher.index().entry(id).size();
        let code_budget = code_budget(fetcher.limits.estimate());
        let index = fetcher.index();
        let compressed_of = |r: &Range<u64>| {
            compressed_bytes(index.chunk_range_for(id, r.start, r.end.saturating_sub(r.start)))
        };
        let parts = loader_parts(
            &elf,
            size,
            compressed_size(&fetcher, id),
            code_budget,
            compressed_of,
        );
        // The writable segments in a request of their own (see
        // `writable_apart`).
        let (writable, rest) = writable_apart(&elf, parts);
        for parts in [writable, rest] {
            if parts.is_empty() {
                continue;
            }
            let parts: Vec<(EntryId, Range<u64>)> = parts.into_iter().map(|r| (id, r)).collect();
            let this = Arc::clone(self);
            let f = Arc::clone(&fetcher);
            fetcher.spawn(async move {
                this.fetch(&f, &parts, None).await;
            });
        }
        if depth == 0 && !self.profile_guided() {
            let this = Arc::clone(self);
            let elf = elf.clone();
            fetcher.spawn(async move { this.fetch_named_files((pos, id), &elf).await });
        }
        if depth >= MAX_DEPTH {
            return Ok(());
        }

        // The libraries its string table names, when the start of the file
        // in hand holds it: examined now, a round trip before the dynamic
        // section says which they are. Looked up in the standard directories
        // only (the run path is in the dynamic section): a library the run
        // path finds elsewhere is examined again below, one fetched for
        // nothing at worst.
        for name in self.early_needed(&fetcher, id).await {
            let Some(lib) = standard_dirs(&elf)
                .iter()
                .find_map(|d| self.resolve(&format!("{d}/{name}")))
            else {
                continue;
            };
            self.examine_library(lib, depth + 1);
        }

        // The libraries it needs, looked up like the loader does.
        let libraries = self.needed(&fetcher, id, &elf).await;
        let origin = format!("/{}", path.rsplit_once('/').map_or("", |(d, _)| d));
        let mut search: Vec<String> = Vec::new();
        if let Some(paths) = &libraries.search_path {
            for p in paths.split(':') {
                let p = p.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin);
                if !p.contains('$') && p.starts_with('/') {
                    search.push(p);
                }
            }
        }
        search.extend(standard_dirs(&elf));
        for name in libraries.names {
            groups.push(if name.starts_with('/') {
                vec![name]
            } else if name.contains('/') {
                vec![format!("{origin}/{name}")]
            } else {
                search.iter().map(|d| format!("{d}/{name}")).collect()
            });
        }
        let wanted = groups.len();
        let mut found = 0;
        for group in groups {
            let Some(lib) = group.iter().find_map(|c| self.resolve(c)) else {
                continue;
            };
            found += 1;
            self.shared.libraries.fetch_add(1, Ordering::Relaxed);
            self.examine_library(lib, depth + 1);
        }
        tracing::debug!(file = %path, depth, wanted, found, code_budget, "ELF file examined");
        Ok(())
    }

    /// Examines library `lib` (at `depth` of the tree) in a task of its own,
    /// unless it was examined already.
    fn examine_library(self: &Arc<Self>, lib: Found, depth: u32) {
        let Some(layer) = self.layers.get(lib.0) else {
            return;
        };
        if !self.shared.first_time(layer.digest, lib.1) {
            return;
        }
        if let Some(f) = self.fetcher(lib.0) {
            let this = Arc::clone(self);
            f.spawn(this.examine(lib, None, depth));
        }
    }

    /// The first bytes of file `id`, fetched together with what the loader
    /// reads next if it is a program: the whole file when it is small, else
    /// its start (the headers and, in most binaries, the dynamic string
    /// table: [`LibraryStack::early_needed`]) and its end (the writable
    /// segment and dynamic section, in most binaries).
    async fn head(&self, fetcher: &Arc<Fetcher>, id: EntryId) -> Result<Bytes, &'static str> {
        let size = fetcher.index().entry(id).size();
        let first = if compressed_size(fetcher, id) <= WHOLE_FILE_BYTES {
            vec![(id, 0..size)]
        } else {
            vec![
                (id, 0..EARLY_NAMES_BYTES.min(size)),
                (id, size.saturating_sub(PROGRAM_TAIL_BYTES)..size),
            ]
        };
        self.fetch(fetcher, &first, None).await;
        self.bytes(fetcher, id, 0..HEAD_BYTES.min(size)).await
    }

    /// Prefetches what starting `command` reads first: the files of
    /// [`start_files`] (each layer's at once, so neighbours in the blob share
    /// requests), the program (through `#!` lines to the interpreter), and the
    /// libraries it loads. In the background; advice only.
    pub fn prefetch_start(self: &Arc<Self>, command: StartCommand) {
        let Some(top) = self.fetcher(0) else {
            return;
        };
        // A process running this command later needs no prefetch of its own.
        self.handled.first_time(&command.argv);
        let files = start_files(&command.env)
            .into_iter()
            .filter_map(|path| self.resolve(&path))
            .filter(|found| self.small(*found));
        for (fetcher, parts) in self.whole_files_by_layer(files) {
            let this = Arc::clone(self);
            let f = Arc::clone(&fetcher);
            fetcher.spawn(async move {
                this.fetch(&f, &parts, None).await;
            });
        }
        let this = Arc::clone(self);
        top.spawn(async move { this.start_program(command).await });
    }

    async fn start_program(self: Arc<Self>, command: StartCommand) {
        let words = CommandWords::of(&command.argv);
        let programs = command.argv.first().into_iter().chain(&words.programs);
        let this = &self;
        let command = &command;
        let programs = programs.map(|program| async move {
            if let Err(why) = Arc::clone(this)
                .start_program_named(program, command, true)
                .await
            {
                tracing::debug!(program, why, "start program not prefetched");
            }
        });
        futures::future::join(
            futures::future::join_all(programs),
            self.start_arguments(&words.files, command),
        )
        .await;
    }

    /// Fetches the small files the start command names (a script, a source
    /// file) and examines them like a read from their start would, before the
    /// program that reads them has even loaded.
    async fn start_arguments(self: &Arc<Self>, names: &[String], command: &StartCommand) {
        let mut found: Vec<Found> = Vec::new();
        for name in names {
            let path = if name.starts_with('/') {
                name.clone()
            } else {
                format!("{}/{name}", command.working_dir)
            };
            let Some(file) = self.resolve(&path) else {
                continue;
            };
            if self.small(file) && !found.contains(&file) {
                found.push(file);
            }
        }
        let fetches = self
            .whole_files_by_layer(found.iter().copied())
            .into_iter()
            .map(|(f, parts)| async move { self.fetch(&f, &parts, None).await });
        futures::future::join_all(fetches).await;
        for (pos, id) in found {
            let Some(f) = self.fetcher(pos) else {
                continue;
            };
            let len = f.index().entry(id).size().min(PYTHON_SCAN_BYTES) as u32;
            if let Some(head) = f.read_cached(id, 0, len).await {
                self.examine_started((pos, id), &head);
            }
        }
    }

    /// Finds `program` like `execvp` and examines it, through `#!` lines to
    /// the interpreter. With `scripts`, a shell script's own programs (the
    /// first word of each command in its first [`MAX_SCRIPT_BYTES`]) are
    /// examined too, concurrently (theirs are not: no recursion).
    fn start_program_named<'a>(
        self: Arc<Self>,
        program: &'a str,
        command: &'a StartCommand,
        scripts: bool,
    ) -> futures::future::BoxFuture<'a, Result<(), &'static str>> {
        Box::pin(self.start_program_named_inner(program, command, scripts))
    }

    async fn start_program_named_inner(
        self: Arc<Self>,
        program: &str,
        command: &StartCommand,
        scripts: bool,
    ) -> Result<(), &'static str> {
        let mut program = program.to_owned();
        let mut script_programs: Vec<String> = Vec::new();
        let mut computed: Vec<Found> = Vec::new();
        for _ in 0..=MAX_SCRIPT_HOPS {
            let (pos, id) = self
                .find_program(&program, command)
                .ok_or("program not found in the image")?;
            let fetcher = self.fetcher(pos).ok_or("layer gone")?;
            let layer = self.layers.get(pos).ok_or("layer gone")?;
            let head = self.head(&fetcher, id).await?;
            if ElfFile::has_magic(&head) {
                let this = &self;
                let others = script_programs.iter().map(|p| async move {
                    if let Err(why) = Arc::clone(this).start_program_named(p, command, false).await {
                        tracing::debug!(program = %p, why, "program of the start script not prefetched");
                    }
                });
                let own = async {
                    if self.shared.first_time(layer.digest, id) {
                        Arc::clone(&self).examine((pos, id), Some(head), 0).await;
                    }
                };
                let found_by_name = computed
                    .iter()
                    .filter(|found| self.first_time(**found))
                    .map(|&found| Arc::clone(&self).examine(found, None, 0));
                futures::future::join3(
                    own,
                    futures::future::join_all(others),
                    futures::future::join_all(found_by_name),
                )
                .await;
                return Ok(());
            }
            program = interpreter_of(&head).ok_or("neither an ELF file nor a script")?;
            if scripts && script_programs.is_empty() && is_shell(&program) {
                let mut words = CommandWords::default();
                let text = &head[..head.len().min(MAX_SCRIPT_BYTES)];
                words.script(&String::from_utf8_lossy(text));
                script_programs = words.programs;
                for name in &words.computed {
                    computed.extend(self.programs_named(name).await);
                }
            }
        }
        Err("too many #! interpreters")
    }

    /// The programs named `name` anywhere in the stack (executable regular
    /// files, not hidden by an upper layer): none when more than
    /// [`MAX_PROGRAMS_NAMED`] are, as the name says too little then.
    async fn programs_named(&self, name: &str) -> Vec<Found> {
        self.visible_files_named(name.as_bytes(), MAX_PROGRAMS_NAMED, |entry| {
            entry.mode() & 0o111 != 0
        })
        .await
    }

    /// The regular file `execvp` runs for `program`: a name with a slash is
    /// taken from the working directory, any other is looked up in PATH.
    fn find_program(&self, program: &str, command: &StartCommand) -> Option<Found> {
        if program.starts_with('/') {
            return self.resolve(program);
        }
        if program.contains('/') {
            return self.resolve(&format!("{}/{program}", command.working_dir));
        }
        command
            .path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .take(MAX_PATH_DIRS)
            .find_map(|d| self.resolve(&format!("{d}/{program}")))
    }

    /// The library names (and the search path) in the dynamic section of `id`.
    async fn needed(&self, fetcher: &Arc<Fetcher>, id: EntryId, elf: &ElfFile) -> Needed {
        let mut out = Needed::default();
        let Some(dynamic) = elf.dynamic.clone() else {
            return out;
        };
        let end = dynamic
            .end
            .min(dynamic.start.saturating_add(MAX_DYNAMIC_BYTES));
        let bytes = match self.bytes(fetcher, id, dynamic.start..end).await {
            Ok(b) => b,
            Err(why) => {
                tracing::debug!(file = id.index(), why, "dynamic section not read");
                return out;
            }
        };
        let Ok(info) = elf.dynamic_info(&bytes) else {
            tracing::debug!(file = id.index(), "dynamic section malformed");
            return out;
        };
        let Some(strtab) = info.strtab.and_then(|v| elf.file_offset(v)) else {
            tracing::debug!(file = id.index(), "no string table");
            return out;
        };
        let size = fetcher.index().entry(id).size();
        let name = |off: u64| async move {
            if info.strsz.is_some_and(|sz| off >= sz) {
                return None;
            }
            let at = strtab.checked_add(off)?;
            if at >= size {
                return None;
            }
            let len = u64::from(NAME_READ_BYTES).min(size - at);
            let b = self.bytes(fetcher, id, at..at + len).await.ok()?;
            string_at(&b, 0).map(|s| String::from_utf8_lossy(s).into_owned())
        };
        for &off in &info.needed {
            if let Some(n) = name(off).await {
                out.names.push(n);
            }
        }
        if let Some(off) = info.search_path {
            out.search_path = name(off).await;
        }
        out
    }

    /// The shared library names (`libm.so.6`) in the start of ELF file `id`
    /// already cached, up to [`EARLY_NAMES_BYTES`]: there lies the dynamic
    /// string table of most programs, whose library names are those the
    /// dynamic section needs (and the file's own soname, examined already).
    /// Found before the dynamic section is read, which lies in the writable
    /// segment near the end of the file, a round trip later.
    async fn early_needed(&self, fetcher: &Arc<Fetcher>, id: EntryId) -> Vec<String> {
        let size = fetcher.index().entry(id).size();
        let mut len = EARLY_NAMES_BYTES.min(size);
        let head = loop {
            if len < HEAD_BYTES {
                return Vec::new();
            }
            if let Some(b) = fetcher.read_cached(id, 0, len as u32).await {
                break b;
            }
            len /= 2;
        };
        library_names(&head)
    }

    /// Bytes `range` of file `id`, fetched (as a start-up prefetch) if needed.
    async fn bytes(
        &self,
        fetcher: &Arc<Fetcher>,
        id: EntryId,
        range: Range<u64>,
    ) -> Result<Bytes, &'static str> {
        let len =
            u32::try_from(range.end.saturating_sub(range.start)).map_err(|_| "range too long")?;
        if let Some(b) = fetcher.read_cached(id, range.start, len).await {
            return Ok(b);
        }
        self.fetch(fetcher, &[(id, range.clone())], None).await;
        // Whatever the budget left out stays remote: never a read of its own.
        fetcher
            .read_cached(id, range.start, len)
            .await
            .ok_or("not fetched (budget spent, or the fetch failed)")
    }

    /// Fetches `parts` within the stack's byte budget; returns the compressed
    /// bytes fetched.
    async fn fetch(
        &self,
        fetcher: &Arc<Fetcher>,
        parts: &[(EntryId, Range<u64>)],
        progress: Option<&tokio::sync::Notify>,
    ) -> u64 {
        let left = self
            .shared
            .max_bytes_per_stack
            .saturating_sub(self.spent.load(Ordering::Relaxed));
        if left == 0 {
            return 0;
        }
        let got = fetcher.fetch_file_parts(parts, left, true, progress).await;
        self.spent.fetch_add(got, Ordering::Relaxed);
        self.shared.bytes.fetch_add(got, Ordering::Relaxed);
        got
    }

    /// Whether file `found` is small enough to fetch whole
    /// ([`WHOLE_FILE_BYTES`]); a larger one is left to its reader.
    fn small(&self, (pos, id): Found) -> bool {
        self.fetcher(pos)
            .is_some_and(|f| compressed_size(&f, id) <= WHOLE_FILE_BYTES)
    }

    /// The whole-file parts of `files` grouped by layer, each file once, with
    /// the layer's fetcher (layers gone are left out): a layer's files go in
    /// one batch, so neighbours in its blob share requests.
    fn whole_files_by_layer(
        &self,
        files: impl IntoIterator<Item = Found>,
    ) -> Vec<(Arc<Fetcher>, Vec<FilePart>)> {
        let mut per_layer: Vec<Vec<FilePart>> = vec![Vec::new(); self.layers.len()];
        for (pos, id) in files {
            let (Some(f), Some(parts)) = (self.fetcher(pos), per_layer.get_mut(pos)) else {
                continue;
            };
            if !parts.iter().any(|(seen, _)| *seen == id) {
                parts.push((id, 0..f.index().entry(id).size()));
            }
        }
        per_layer
            .into_iter()
            .enumerate()
            .filter(|(_, parts)| !parts.is_empty())
            .filter_map(|(pos, parts)| Some((self.fetcher(pos)?, parts)))
            .collect()
    }

    fn fetcher(&self, pos: usize) -> Option<Arc<Fetcher>> {
        self.layers.get(pos)?.fetcher.upgrade()
    }

    /// The regular file an absolute `path` names in the stack, the top layer
    /// first, following symbolic links (also in directories, also from one
    /// layer into another). Whiteouts are not looked at: a library hidden by
    /// an upper layer is at worst fetched for nothing.
    fn resolve(&self, path: &str) -> Option<Found> {
        let mut path = normalize(path)?;
        'hop: for _ in 0..MAX_LINK_HOPS {
            for (pos, layer) in self.layers.iter().enumerate() {
                let Some(fetcher) = layer.fetcher.upgrade() else {
                    continue;
                };
                let index = fetcher.index();
                let mut cur = EntryId::ROOT;
                let mut missing = false;
                for (i, comp) in path.iter().enumerate() {
                    let Some(next) = index.lookup(cur, comp.as_bytes()) else {
                        missing = true;
                        break;
                    };
                    let e = index.entry(next);
                    match e.kind() {
                        EntryKind::Symlink => {
                            let target = String::from_utf8_lossy(e.link_target()?).into_owned();
                            let mut joined = if target.starts_with('/') {
                                target
                            } else {
                                format!("/{}/{target}", path[..i].join("/"))
                            };
                            for rest in &path[i + 1..] {
                                joined.push('/');
                                joined.push_str(rest);
                            }
                            path = normalize(&joined)?;
                            continue 'hop;
                        }
                        EntryKind::Dir if i + 1 < path.len() => cur = next,
                        EntryKind::Reg if i + 1 == path.len() => return Some((pos, next)),
                        _ => return None,
                    }
                }
                if !missing {
                    return None;
                }
            }
            return None;
        }
        None
    }
}

/// Words a start command holds beyond its program, bounded
/// ([`MAX_COMMAND_WORDS`] each, scripts read up to [`MAX_SCRIPT_BYTES`]).
#[derive(Debug, Default, PartialEq)]
struct CommandWords {
    /// Programs a shell's `-c` script runs: the first word of each of its
    /// commands (`gcc` in `sh -c "gcc -o /tmp/x x.c && /tmp/x"`).
    programs: Vec<String>,
    /// Words that may name files (a script, a source file): not options,
    /// and with a slash or a dot in them.
    files: Vec<String>,
    /// The names a script gives to files in a directory it computes
    /// (`initdb` of `"$bin/initdb"`): programs it may run, found by name.
    computed: Vec<String>,
}

/// Programs and files taken from one start command, each.
const MAX_COMMAND_WORDS: usize = 16;

/// Programs found for one name a script computes the directory of, at most.
const MAX_PROGRAMS_NAMED: usize = 2;

/// Bytes of a shell's `-c` script looked at.
const MAX_SCRIPT_BYTES: usize = 4096;

/// Shells whose `-c` argument is a script.
const SHELLS: [&str; 7] = ["sh", "bash", "dash", "ash", "zsh", "ksh", "busybox"];

/// Shell words that are not a command's program.
const SHELL_KEYWORDS: [&str; 14] = [
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "case", "esac",
    "exec", "!",
];

impl CommandWords {
    /// The words of `argv` (Entrypoint then Cmd).
    fn of(argv: &[String]) -> CommandWords {
        let mut out = CommandWords::default();
        let Some(program) = argv.first() else {
            return out;
        };
        let shell = is_shell(program);
        let mut i = 1;
        while i < argv.len() {
            let arg = &argv[i];
            let c_option = arg.len() > 1
                && arg.starts_with('-')
                && !arg.starts_with("--")
                && arg.ends_with('c');
            if shell && c_option {
                if let Some(script) = argv.get(i + 1) {
                    out.script(script);
                }
                i += 2;
                continue;
            }
            out.file(arg);
            i += 1;
        }
        out
    }

    /// Takes the words of a shell script: programs at command positions,
    /// files elsewhere. Quotes are dropped, expansions are not made (a word
    /// with `$` is skipped).
    fn script(&mut self, script: &str) {
        let script = &script.as_bytes()[..script.len().min(MAX_SCRIPT_BYTES)];
        let mut command_start = true;
        let mut word = String::new();
        let flush = |word: &mut String, command_start: &mut bool, this: &mut CommandWords| {
            if word.is_empty() {
                return;
            }
            let w = std::mem::take(word);
            if let Some(name) = computed_name(&w) {
                if this.computed.len() < MAX_COMMAND_WORDS
                    && !this.computed.iter().any(|c| c == name)
                {
                    this.computed.push(name.to_owned());
                }
            }
            if *command_start {
                let assignment = w.split('/').next().is_some_and(|h| h.contains('='));
                if SHELL_KEYWORDS.contains(&w.as_str()) || assignment {
                    return;
                }
                *command_start = false;
                if !w.contains('$')
                    && this.programs.len() < MAX_COMMAND_WORDS
                    && !this.programs.contains(&w)
                {
                    this.programs.push(w);
                }
            } else {
                this.file(&w);
            }
        };
        let mut comment = false;
        let mut expansion = false;
        let mut escaped = false;
        for &b in script {
            // A backslash before a newline continues the command.
            if std::mem::take(&mut escaped) && b == b'\n' {
                continue;
            }
            if b == b'\\' && !comment {
                escaped = true;
                continue;
            }
            if comment {
                comment = b != b'\n';
                if comment {
                    continue;
                }
            }
            match b {
                b'#' if word.is_empty() => comment = true,
                // A parameter expansion (`${bin}`), not a brace group.
                b'{' if word.ends_with('$') => {
                    word.push('{');
                    expansion = true;
                }
                b'}' if expansion => {
                    word.push('}');
                    expansion = false;
                }
                b';' | b'&' | b'|' | b'\n' | b'(' | b')' | b'{' | b'}' => {
                    flush(&mut word, &mut command_start, self);
                    command_start = true;
                }
                b' ' | b'\t' | b'<' | b'>' => flush(&mut word, &mut command_start, self),
                b'\'' | b'"' | b'`' => {}
                b => {
                    if let Some(c) = char::from_u32(u32::from(b)).filter(|_| b.is_ascii()) {
                        word.push(c);
                    } else {
                        // Not ASCII: no program or file name zest would find.
                        word.push('\u{fffd}');
                    }
                }
            }
        }
        flush(&mut word, &mut command_start, self);
    }

    /// Takes `word` as a file name if it may be one.
    fn file(&mut self, word: &str) {
        let may_be_file = !word.is_empty()
            && word.len() <= 4096
            && !word.starts_with('-')
            && (word.contains('/') || word.contains('.'))
            && !word.contains([
                '=', '$', '*', '?', ' ', '\t', '(', ')', '"', '\'', ';', '<', '>', '|', '&', '`',
                '{', '}', '\u{fffd}',
            ]);
        if may_be_file
            && self.files.len() < MAX_COMMAND_WORDS
            && !self.files.iter().any(|f| f == word)
        {
            self.files.push(word.to_owned());
        }
    }
}

/// The file name of a word naming a file in a directory held by a shell
/// variable (`$bin/initdb`, `${dir}/run.sh`): `initdb`, `run.sh`.
fn computed_name(word: &str) -> Option<&str> {
    let (dir, name) = word.rsplit_once('/')?;
    let var = dir.strip_prefix('$')?;
    let var = var
        .strip_prefix('{')
        .and_then(|v| v.strip_suffix('}'))
        .unwrap_or(var);
    let identifier = !var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let file_name = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'));
    (identifier && file_name).then_some(name)
}

/// Whether `program` (a path or a name) is a shell.
fn is_shell(program: &str) -> bool {
    SHELLS.contains(&program.rsplit('/').next().unwrap_or(program))
}

/// The program a script's `#!` line runs: its interpreter, or the command
/// `/usr/bin/env` is given (looked up in PATH by the caller).
fn interpreter_of(head: &[u8]) -> Option<String> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let interpreter = words.next()?;
    if interpreter.rsplit('/').next() == Some("env") {
        // `env -S ...` and other options: the first word that is not one.
        return words
            .find(|w| !w.starts_with('-') && !w.contains('='))
            .map(str::to_owned);
    }
    Some(interpreter.to_owned())
}

/// Library names and search path read from a dynamic section.
#[derive(Default)]
struct Needed {
    names: Vec<String>,
    search_path: Option<String>,
}

/// The components of an absolute path with `.` and `..` applied; `None` when
/// it is not absolute or empty.
fn normalize(path: &str) -> Option<Vec<String>> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_owned()),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The loader's default directories for `elf`'s machine: multiarch first
/// (Debian and Ubuntu), then the 64-bit and plain library directories.
fn standard_dirs(elf: &ElfFile) -> Vec<String> {
    let mut dirs = Vec::new();
    if let Some(t) = multiarch_triplet(elf.machine, elf.is_64) {
        dirs.push(format!("/lib/{t}"));
        dirs.push(format!("/usr/lib/{t}"));
    }
    if elf.is_64 {
        dirs.push("/lib64".into());
        dirs.push("/usr/lib64".into());
    }
    dirs.push("/lib".into());
    dirs.push("/usr/lib".into());
    dirs.push("/usr/local/lib".into());
    dirs
}

/// The compressed size of file `id`.
fn compressed_size(fetcher: &Fetcher, id: EntryId) -> u64 {
    compressed_bytes(fetcher.index().entry(id).chunks())
}

/// The compressed bytes of `chunks`.
fn compressed_bytes(chunks: &[Chunk]) -> u64 {
    chunks
        .iter()
        .map(|c| u64::from(c.compressed_len))
        .fold(0u64, u64::saturating_add)
}

/// Compressed bytes of code a library's fetch may include whole on this link
/// ([`CODE_BDPS`]); 0 before the link is measured.
fn code_budget(link: Option<LinkEstimate>) -> u64 {
    link.map_or(0, |l| {
        l.link_bdp()
            .saturating_mul(CODE_BDPS)
            .min(MAX_CODE_FETCH_BYTES)
    })
}

/// The byte ranges of an ELF file of `size` bytes (`compressed` once
/// compressed) that the loader reads before the program runs: the whole file
/// when it is small; otherwise every segment but large code (headers, symbol
/// and hash tables, relocations, constants; the writable ones are relocated;
/// code up to [`MAX_CODE_BYTES`], or larger code whose compressed bytes,
/// `compressed_of` the segment, are at most `code_budget`, whole), others up
/// to [`MAX_SEGMENT_BYTES`], and the dynamic section.
pub(crate) fn loader_parts(
    elf: &ElfFile,
    size: u64,
    compressed: u64,
    code_budget: u64,
    compressed_of: impl Fn(&Range<u64>) -> u64,
) -> Vec<Range<u64>> {
    if compressed <= WHOLE_FILE_BYTES {
        return std::iter::once(0..size).collect();
    }
    let mut parts: Vec<Range<u64>> = elf
        .segments
        .iter()
        .filter_map(|s| {
            let code = s.executable && !s.writable;
            if !code {
                // The read-only ones hold the headers, symbol and hash tables
                // and relocations the loader reads, and the constants
                // start-up code reads (measured: leaving the later read-only
                // segment to demand was slower for node and postgres); the
                // writable ones are relocated. A huge one is read from its
                // start.
                let end = s
                    .file
                    .end
                    .min(s.file.start.saturating_add(MAX_SEGMENT_BYTES));
                return Some(s.file.start..end);
            }
            // Code is faulted in all over, a round trip per place: whole, or
            // left to demand.
            let small = s.file.end.saturating_sub(s.file.start) <= MAX_CODE_BYTES;
            (small || compressed_of(&s.file) <= code_budget).then(|| s.file.clone())
        })
        .collect();
    parts.push(0..HEAD_BYTES.min(size));
    if let Some(d) = &elf.dynamic {
        parts.push(d.clone());
    }
    parts.retain(|r| r.start < size && r.start < r.end);
    parts
}

/// The distinct shared library file names (`lib*.so*`, `ld-*.so*`) among
/// the NUL-terminated strings of `bytes`, at most [`MAX_EARLY_NAMES`].
fn library_names(bytes: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in bytes.split(|&b| b == 0) {
        if names.len() >= MAX_EARLY_NAMES {
            break;
        }
        if !(s.starts_with(b"lib") || s.starts_with(b"ld-")) || s.len() > 64 {
            continue;
        }
        let Ok(name) = std::str::from_utf8(s) else {
            continue;
        };
        let Some((stem, version)) = name.split_once(".so") else {
            continue;
        };
        let plausible = stem.len() > 3
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
            && (version.is_empty()
                || (version.starts_with('.')
                    && version[1..]
                        .split('.')
                        .all(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))));
        if plausible && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// Splits the loader's `parts` of an ELF file into those of its writable
/// segments (the dynamic section is in one) and the rest, to be fetched in
/// requests of their own. The loader relocates the writable segments (and
/// the kernel clears a program's) before any code runs; in one stream with
/// the code before them in the file they arrived last, and python's and
/// libcrypto's faulted meanwhile, a blocking miss each.
fn writable_apart(elf: &ElfFile, parts: Vec<Range<u64>>) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
    parts.into_iter().partition(|r| {
        elf.segments
            .iter()
            .any(|s| s.writable && r.start < s.file.end && s.file.start < r.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zest_format::elf::Segment;

    #[test]
    fn library_names_are_taken_from_a_string_table() {
        let table = b"\0libm.so.6\0libz.so.1\0__gmon_start__\0libc.so.6\0GLIBC_2.2.5\0\
            ld-linux-x86-64.so.2\0libfoo.so\0libc.so.6\0liberty.sort\0lib.so.1\0\
            libx.so.1a\0libbar.so.\0/usr/lib/libabs.so.1\0libpython3.11.so.1.0\0";
        assert_eq!(
            library_names(table),
            [
                "libm.so.6",
                "libz.so.1",
                "libc.so.6",
                "ld-linux-x86-64.so.2",
                "libfoo.so",
                "libpython3.11.so.1.0"
            ]
        );
        // Bounded however many a hostile file holds.
        let many: Vec<u8> = (0..1000)
            .flat_map(|i| format!("lib{i}.so\0").into_bytes())
            .collect();
        assert_eq!(library_names(&many).len(), MAX_EARLY_NAMES);
        assert!(library_names(&[0xff; 100]).is_empty());
    }

    #[test]
    fn writable_segments_are_fetched_apart_from_the_code_before_them() {
        let segment = |file: Range<u64>, executable, writable| Segment {
            vaddr: file.start,
            file,
            executable,
            writable,
        };
        let e = elf(vec![
            segment(0..4096, false, false),
            segment(4096..3_000_000, true, false),
            segment(3_000_000..3_500_000, false, false),
            segment(3_500_000..3_900_000, false, true),
        ]);
        let parts = loader_parts(&e, 3_900_000, 2_000_000, 4_000_000, |_| 0);
        let (writable, rest) = writable_apart(&e, parts.clone());
        assert_eq!(writable.len() + rest.len(), parts.len());
        assert!(writable.contains(&(3_500_000..3_900_000)), "{writable:?}");
        for code in [0..4096, 4096..3_000_000, 3_000_000..3_500_000] {
            assert!(rest.contains(&code), "{code:?} in {rest:?}");
        }
        // A small file is one part, the whole file, fetched in one request.
        let small = loader_parts(&e, 3_900_000, 100_000, 4_000_000, |_| 0);
        assert_eq!(writable_apart(&e, small).0, vec![0..3_900_000]);
    }

    fn elf(segments: Vec<Segment>) -> ElfFile {
        ElfFile {
            is_64: true,
            little_endian: true,
            machine: 62,
            interp: None,
            segments,
            dynamic: Some(9000..9100),
        }
    }

    #[test]
    fn small_files_are_fetched_whole_large_ones_by_segment() {
        let e = elf(vec![
            Segment {
                file: 0..5000,
                vaddr: 0,
                executable: false,
                writable: false,
            },
            Segment {
                file: 5000..8_000_000,
                vaddr: 8192,
                executable: true,
                writable: false,
            },
            Segment {
                file: 8_000_000..8_100_000,
                vaddr: 9_000_000,
                executable: false,
                writable: true,
            },
        ]);
        let whole = loader_parts(&e, 8_100_000, 100_000, 0, |_| 0);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0], 0..8_100_000);
        // Code compressing to 2 MB, on a link not measured yet.
        let code_2mb = |r: &Range<u64>| if r.contains(&6000) { 2_000_000 } else { 1000 };
        let parts = loader_parts(&e, 8_100_000, 3_000_000, 0, code_2mb);
        assert!(parts.contains(&(0..5000)));
        assert!(parts.contains(&(8_000_000..8_100_000)));
        assert!(parts.contains(&(9000..9100)));
        assert!(
            !parts.iter().any(|r| r.contains(&6000)),
            "code is left to demand: {parts:?}"
        );
        // On a link where that is at most CODE_BDPS round trips of transfer
        // (20 ms, 25 MB/s: 4 MB) the code is fetched whole; on a slower
        // one (2 MB/s: 320 kB) it is not.
        let link = |bytes_per_sec: f64| {
            Some(LinkEstimate {
                rtt: std::time::Duration::from_millis(20),
                // Shared with other requests: only the link's rate counts.
                bytes_per_sec: bytes_per_sec / 4.0,
                peak_bytes_per_sec: bytes_per_sec,
            })
        };
        assert_eq!(code_budget(None), 0);
        assert_eq!(code_budget(link(25e6)), 4_000_000);
        let parts = loader_parts(&e, 8_100_000, 3_000_000, code_budget(link(25e6)), code_2mb);
        assert!(parts.contains(&(5000..8_000_000)), "whole: {parts:?}");
        let parts = loader_parts(&e, 8_100_000, 3_000_000, code_budget(link(2e6)), code_2mb);
        assert!(!parts.iter().any(|r| r.contains(&6000)), "{parts:?}");
        // However fast the link, at most MAX_CODE_FETCH_BYTES.
        assert_eq!(code_budget(link(1e12)), MAX_CODE_FETCH_BYTES);
        // Small code (a C library's, a program's) is fetched with the rest.
        let mut small_code = e.clone();
        small_code.segments[1].file = 5000..5000 + MAX_CODE_BYTES;
        let parts = loader_parts(&small_code, 8_100_000, 3_000_000, 0, code_2mb);
        assert!(parts.contains(&(5000..5000 + MAX_CODE_BYTES)), "{parts:?}");
        // A huge read-only segment is cut; ranges past the end are dropped.
        let e = elf(vec![Segment {
            file: 0..100 << 20,
            vaddr: 0,
            executable: false,
            writable: false,
        }]);
        let parts = loader_parts(&e, 5000, 1 << 30, 0, |_| 0);
        assert!(parts.iter().all(|r| r.start < 5000));
        let parts = loader_parts(&e, 200 << 20, 1 << 30, 0, |_| 0);
        assert!(parts.contains(&(0..MAX_SEGMENT_BYTES)));
    }

    #[test]
    fn scripts_name_their_interpreter() {
        let i = |s: &[u8]| interpreter_of(s);
        assert_eq!(i(b"#!/bin/sh\necho\n").as_deref(), Some("/bin/sh"));
        assert_eq!(
            i(b"#! /usr/bin/python3 -u\n").as_deref(),
            Some("/usr/bin/python3")
        );
        assert_eq!(i(b"#!/usr/bin/env node\n").as_deref(), Some("node"));
        assert_eq!(
            i(b"#!/usr/bin/env -S LANG=C python3 -u\n").as_deref(),
            Some("python3")
        );
        assert_eq!(i(b"#!/usr/bin/env\n"), None);
        assert_eq!(i(b"#!/bin/sh"), None, "a line cut short");
        assert_eq!(i(b"\x7fELF"), None);
        assert_eq!(i(b"#!\xff\xfe\n"), None);
    }

    #[test]
    fn start_commands_name_programs_and_files() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let words = CommandWords::of(&argv(&[
            "sh",
            "-c",
            "gcc -o /tmp/hello /bench/hello.c && /tmp/hello; X=1 exec env > out.log",
        ]));
        assert_eq!(words.programs, ["gcc", "/tmp/hello", "env"]);
        assert_eq!(words.files, ["/tmp/hello", "/bench/hello.c", "out.log"]);
        let words = CommandWords::of(&argv(&["python3", "/bench/imports.py", "-v", "--x=a.b"]));
        assert!(words.programs.is_empty());
        assert_eq!(words.files, ["/bench/imports.py"]);
        let words = CommandWords::of(&argv(&["node", "-e", "console.log(\"hello\")"]));
        assert_eq!(words, CommandWords::default());
        let words = CommandWords::of(&argv(&[
            "/bin/bash",
            "-ec",
            "if true; then run.sh $HOME/x; fi",
        ]));
        assert_eq!(words.programs, ["true", "run.sh"]);
        assert!(words.files.is_empty());
        let mut words = CommandWords::default();
        words.script(
            "#!/bin/sh\n# a comment; rm -rf x\nset -eu\nd=$(mktemp -d) # why\nchown a \"$d\"\n",
        );
        assert_eq!(words.programs, ["set", "mktemp", "chown"]);
        // Bounded whatever the command.
        let long = "a.sh ".repeat(10_000) + &"; p".repeat(10_000);
        let words = CommandWords::of(&argv(&["sh", "-c", &long]));
        assert!(words.programs.len() <= MAX_COMMAND_WORDS);
        assert!(words.files.len() <= MAX_COMMAND_WORDS);
        assert!(CommandWords::of(&[]).files.is_empty());
        // Programs in a directory the script computes: by name.
        let mut words = CommandWords::default();
        words.script(
            "for d in /usr/lib/pg/*/bin; do bin=$d; done\n[ -x \"$bin/initdb\" ]\n\
             $as_pg \"$bin/initdb\" -D \"$data\"\nexec $as_pg \"${bin}/postgres\" -c x=$y/z\n",
        );
        assert_eq!(words.computed, ["initdb", "postgres"]);
        // A continued line is one command.
        let mut words = CommandWords::default();
        words.script("run --a \\\n  --b x.conf\n");
        assert_eq!(words.programs, ["run"]);
        assert_eq!(words.files, ["x.conf"]);
    }

    #[test]
    fn names_in_computed_directories() {
        assert_eq!(computed_name("$bin/initdb"), Some("initdb"));
        assert_eq!(computed_name("${PGBIN}/pg_ctl"), Some("pg_ctl"));
        assert_eq!(computed_name("$HOME/run.sh"), Some("run.sh"));
        for word in [
            "/usr/bin/x",
            "$bin/",
            "$bin/..",
            "$a/$b",
            "$(pwd)/x",
            "${a/x",
            "$/x",
            "x$y/z",
        ] {
            assert_eq!(computed_name(word), None, "{word}");
        }
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(
            normalize("/usr/lib/../lib/./x/libc.so.6").unwrap(),
            ["usr", "lib", "x", "libc.so.6"]
        );
        assert_eq!(normalize("/../../etc").unwrap(), ["etc"]);
        assert!(normalize("relative/path").is_none());
        assert!(normalize("/").is_none());
    }

    #[test]
    fn standard_directories_put_multiarch_first() {
        let dirs = standard_dirs(&elf(vec![]));
        assert_eq!(dirs[0], "/lib/x86_64-linux-gnu");
        assert_eq!(dirs[1], "/usr/lib/x86_64-linux-gnu");
        assert!(dirs.contains(&"/usr/lib64".to_string()));
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_environment_names_the_locale_and_time_zone_files_read_at_start() {
        // Without locale or time zone variables: the fixed set only.
        let plain = start_files(&env(&[("PATH", "/usr/bin")]));
        assert_eq!(plain, START_FILES.map(str::to_owned).to_vec());
        // LANG=C.UTF-8 (official images): both directory spellings, the
        // archive and aliases, and the conversion cache.
        let files = start_files(&env(&[("LANG", "C.UTF-8")]));
        for f in [
            "/usr/lib/locale/C.UTF-8/LC_CTYPE",
            "/usr/lib/locale/C.utf8/LC_CTYPE",
            "/usr/lib/locale/C.utf8/LC_MESSAGES/SYS_LC_MESSAGES",
            "/usr/lib/locale/locale-archive",
            "/usr/share/locale/locale.alias",
            "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
            "/usr/lib64/gconv/gconv-modules.cache",
        ] {
            assert!(files.iter().any(|x| x == f), "{f} in {files:?}");
        }
        // The codeset normalized as the C library does; modifiers kept.
        assert_eq!(
            normalized_locale("en_US.UTF-8").as_deref(),
            Some("en_US.utf8")
        );
        assert_eq!(
            normalized_locale("de_DE.ISO-8859-15@euro").as_deref(),
            Some("de_DE.iso885915@euro")
        );
        assert_eq!(normalized_locale("ja_JP.eucjp"), None);
        assert_eq!(normalized_locale("en_US"), None);
        // LC_ALL overrides the rest; C and POSIX are built in: no files.
        for vars in [
            [("LC_ALL", "C"), ("LANG", "en_US.UTF-8")],
            [("LANG", "POSIX"), ("LC_CTYPE", "")],
        ] {
            let files = start_files(&env(&vars));
            assert!(!files.iter().any(|f| f.contains("/locale")), "{files:?}");
        }
        let files = start_files(&env(&[("LC_ALL", "fr_FR.UTF-8"), ("LANG", "en_US.UTF-8")]));
        assert!(files.iter().any(|f| f.contains("fr_FR.utf8")));
        assert!(!files.iter().any(|f| f.contains("en_US")));
        // TZ: a zone name, or an absolute path; anything else is ignored.
        let zone = |tz: &str| {
            let files = start_files(&env(&[("TZ", tz)]));
            files[START_FILES.len()..].to_vec()
        };
        assert_eq!(zone(":Europe/Paris"), ["/usr/share/zoneinfo/Europe/Paris"]);
        assert_eq!(zone("UTC"), ["/usr/share/zoneinfo/UTC"]);
        assert_eq!(zone("/etc/zone"), ["/etc/zone"]);
        for hostile in ["../../etc/shadow", "Europe//Paris", "CET-1CEST,M3.5.0", ""] {
            assert!(zone(hostile).is_empty(), "{hostile}");
        }
        // Hostile locale names are skipped; however many variables, bounded.
        for name in ["../x", "a/b", ".UTF-8", &"x".repeat(200)] {
            let files = start_files(&env(&[("LANG", name)]));
            assert!(!files.iter().any(|f| f.contains("/locale/")), "{name}");
        }
        let many: Vec<(String, String)> = LOCALE_CATEGORIES
            .iter()
            .chain(&["LANG"])
            .enumerate()
            .map(|(i, v)| ((*v).to_owned(), format!("l{i}_XX.UTF-8")))
            .collect();
        let files = start_files(&many);
        let limit =
            START_FILES.len() + 2 + MAX_LOCALES * 2 * LOCALE_CATEGORIES.len() + GCONV_DIRS.len();
        assert!(files.len() <= limit, "{} files", files.len());
    }
}
