//! Snapshot metadata in an embedded transactional database (redb, one file
//! `metadata.redb` in the state directory).
//!
//! Tables:
//! - `snapshots`: snapshot key or name -> JSON [`Record`] (numeric id, kind, parent
//!   name, labels, times, usage of committed snapshots, remote layer record);
//! - `children`: (parent id, child id) -> child name, so that "has children" is one
//!   range lookup and parent links follow a commit's rename;
//! - `meta`: `next_id` (ids are never reused) and `schema`.
//!
//! Invariants: every write is one redb transaction that is either fully durable
//! (fsynced at commit) or absent after a crash; a record exists only once its
//! directory exists (the caller's `place` step runs inside the transaction, before
//! the commit); a parent is always a committed snapshot with a `children` entry for
//! each child.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::remote::RemoteLayer;
use super::types::{DbResultExt, Info, Kind, Labels, SnapshotError, Usage};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: TableDefinition<(u64, u64), &str> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA_KEY: &str = "schema";
const NEXT_ID_KEY: &str = "next_id";
/// Version of the record layout; bump on incompatible changes.
const SCHEMA_VERSION: u64 = 1;

/// One stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Numeric id: the directory `snapshots/<id>` in the state directory.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Name of the committed parent.
    pub parent: Option<String>,
    /// Labels (never with empty values).
    pub labels: Labels,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: i64,
    /// Last update, nanoseconds since the Unix epoch.
    pub updated_ns: i64,
    /// Usage recorded at commit time (committed snapshots only).
    #[serde(default)]
    pub usage: Usage,
    /// Set for a layer mounted by a remote layer provider.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

impl Record {
    /// The containerd view of this record.
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: from_nanos(self.created_ns),
            updated: from_nanos(self.updated_ns),
            labels: self.labels.clone(),
        }
    }
}

/// A snapshot in the parent chain of another.
#[derive(Debug, Clone)]
pub struct Ancestor {
    /// Numeric id (directory).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Remote layer record, if the ancestor is a remote layer.
    pub remote: Option<RemoteLayer>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    /// Key (or name, for a committed snapshot).
    pub key: String,
    /// Kind.
    pub kind: Kind,
    /// Parent name.
    pub parent: Option<String>,
    /// Labels, already normalized.
    pub labels: Labels,
    /// Remote layer record.
    pub remote: Option<RemoteLayer>,
    /// Id reserved earlier with [`MetaStore::reserve_id`]; `None` allocates one.
    pub id: Option<u64>,
}

/// The metadata database.
pub struct MetaStore {
    db: Database,
}

fn now_ns() -> i64 {
    to_nanos(SystemTime::now())
}

fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

fn from_nanos(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SnapshotError::Corrupt(format!("record of snapshot {key:?}: {e}")))
}

fn encode(record: &Record) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(record).map_err(|e| SnapshotError::Internal(format!("encode record: {e}")))
}

fn get<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<Record>, SnapshotError> {
    match table.get(key).db("read snapshot")? {
        Some(value) => decode(key, value.value()).map(Some),
        None => Ok(None),
    }
}

/// Follows parent links from `record`, nearest ancestor first. Bounded by the number
/// of stored snapshots, so a (corrupt) cycle is reported instead of looping.
fn ancestors<T: ReadableTable<&'static str, &'static [u8]> + ReadableTableMetadata>(
    table: &T,
    record: &Record,
) -> Result<Vec<Ancestor>, SnapshotError> {
    let limit = table.len().db("count snapshots")?;
    let mut chain = Vec::new();
    let mut next = record.parent.clone();
    while let Some(name) = next {
        if chain.len() as u64 >= limit {
            return Err(SnapshotError::Corrupt(format!(
                "parent chain through {name:?} is a cycle"
            )));
        }
        let parent = get(table, &name)?.ok_or_else(|| {
            SnapshotError::Corrupt(format!("parent {name:?} of a stored snapshot is missing"))
        })?;
        next = parent.parent.clone();
        chain.push(Ancestor {
            id: parent.id,
            name,
            remote: parent.remote,
        });
    }
    Ok(chain)
}

impl MetaStore {
    /// Opens (creating if needed) the database file. Fails if another process has it
    /// open, which also keeps two services off one state directory.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => SnapshotError::FailedPrecondition(format!(
                "{} is in use by another process: is another zest service running on the same state directory?",
                path.display()
            )),
            other => SnapshotError::Database {
                op: "open",
                source: Box::new(other.into()),
            },
        })?;
        write(&db, |txn| {
            txn.open_table(SNAPSHOTS).db("create table")?;
            txn.open_table(CHILDREN).db("create table")?;
            let mut meta = txn.open_table(META).db("create table")?;
            let schema = meta.get(SCHEMA_KEY).db("read schema")?.map(|v| v.value());
            match schema {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION).db("write schema")?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "{} has metadata schema {other}, this zest understands {SCHEMA_VERSION}: use a newer zest",
                        path.display()
                    )))
                }
            }
            Ok(())
        })?;
        Ok(MetaStore { db })
    }

    /// The record of `key`.
    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let txn = self.db.begin_read().db("begin")?;
        let table = txn.open_table(SNAPSHOTS).db("open table")?;
        get(&table, key)
    }

    /// The record of `key` and its parent chain, nearest first.
    pub fn get_with_ancestors(
        &self,
        key: &str,
    ) -> Result<Option<(Record, Vec<Ancestor>)>, SnapshotError> {
        let txn = self.db.begin_read().db("begin")?;
        let table = txn.open_table(SNAPSHOTS).db("open table")?;
        match get(&table, key)? {
            Some(record) => {
                let chain = ancestors(&table, &record)?;
                Ok(Some((record, chain)))
            }
            None => Ok(None),
        }
    }

    /// All snapshots, ordered by name.
    pub fn list(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let txn = self.db.begin_read().db("begin")?;
        let table = txn.open_table(SNAPSHOTS).db("open table")?;
        let mut out = Vec::new();
        for entry in table.iter().db("scan snapshots")? {
            let (key, value) = entry.db("scan snapshots")?;
            let name = key.value().to_owned();
            let record = decode(&name, value.value())?;
            out.push((name, record));
        }
        Ok(out)
    }

    /// Allocates an id in its own transaction, for a directory that must exist before
    /// the snapshot's record can be written (a remote mount target).
    pub fn reserve_id(&self) -> Result<u64, SnapshotError> {
        write(&self.db, |txn| {
            let mut meta = txn.open_table(META).db("open table")?;
            next_id(&mut meta)
        })
    }

    /// Creates a snapshot record. `place(id, ancestors)` runs inside the transaction
    /// after all checks and must put the snapshot's directory in place; if it fails,
    /// nothing is written.
    pub fn create(
        &self,
        new: NewSnapshot,
        place: impl FnOnce(u64, &[Ancestor]) -> Result<(), SnapshotError>,
    ) -> Result<(Record, Vec<Ancestor>), SnapshotError> {
        write(&self.db, |txn| {
            let mut snapshots = txn.open_table(SNAPSHOTS).db("open table")?;
            let mut children = txn.open_table(CHILDREN).db("open table")?;
            let mut meta = txn.open_table(META).db("open table")?;
            let (parent_id, chain) = match &new.parent {
                None => (None, Vec::new()),
                Some(parent) => {
                    let record = get(&snapshots, parent)?.ok_or_else(|| {
                        SnapshotError::NotFound(format!("parent snapshot {parent}"))
                    })?;
                    if record.kind != Kind::Committed {
                        // containerd's own snapshotters answer "invalid argument" here.
                        return Err(SnapshotError::InvalidArgument(format!(
                            "parent {parent:?} is not a committed snapshot"
                        )));
                    }
                    let mut chain = ancestors(&snapshots, &record)?;
                    chain.insert(
                        0,
                        Ancestor {
                            id: record.id,
                            name: parent.clone(),
                            remote: record.remote.clone(),
                        },
                    );
                    (Some(record.id), chain)
                }
            };
            if snapshots
                .get(new.key.as_str())
                .db("read snapshot")?
                .is_some()
            {
                return Err(SnapshotError::AlreadyExists(format!(
                    "snapshot {}",
                    new.key
                )));
            }
            let id = match new.id {
                Some(id) => id,
                None => next_id(&mut meta)?,
            };
            let now = now_ns();
            let record = Record {
                id,
                kind: new.kind,
                parent: new.parent.clone(),
                labels: new.labels,
                created_ns: now,
                updated_ns: now,
                usage: Usage::default(),
                remote: new.remote,
            };
            snapshots
                .insert(new.key.as_str(), encode(&record)?.as_slice())
                .db("write snapshot")?;
            if let Some(parent_id) = parent_id {
                children
                    .insert((parent_id, id), new.key.as_str())
                    .db("write parent link")?;
            }
            place(id, &chain)?;
            Ok((record, chain))
        })
    }

    /// Turns active snapshot `key` into committed snapshot `name`, with `labels`
    /// replacing the old ones and `usage` recorded. A parentless snapshot may be given
    /// a parent at this point.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: Labels,
        parent: Option<&str>,
        usage: Usage,
    ) -> Result<Record, SnapshotError> {
        write(&self.db, |txn| {
            let mut snapshots = txn.open_table(SNAPSHOTS).db("open table")?;
            let mut children = txn.open_table(CHILDREN).db("open table")?;
            if snapshots.get(name).db("read snapshot")?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!(
                    "committed snapshot {name}"
                )));
            }
            let mut record = get(&snapshots, key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("active snapshot {key}")))?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            match (&record.parent, parent) {
                (Some(old), Some(new)) if old != new => {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot change parent of active snapshot {key:?} on commit"
                    )))
                }
                (None, Some(new)) => {
                    let parent_record = get(&snapshots, new)?
                        .ok_or_else(|| SnapshotError::NotFound(format!("parent snapshot {new}")))?;
                    if parent_record.kind != Kind::Committed {
                        return Err(SnapshotError::FailedPrecondition(format!(
                            "parent {new:?} is not committed"
                        )));
                    }
                    record.parent = Some(new.to_owned());
                }
                _ => {}
            }
            if let Some(parent) = &record.parent {
                let parent_id = get(&snapshots, parent)?
                    .ok_or_else(|| {
                        SnapshotError::Corrupt(format!("parent {parent:?} of {key:?} is missing"))
                    })?
                    .id;
                children
                    .insert((parent_id, record.id), name)
                    .db("write parent link")?;
            }
            let now = now_ns();
            record.kind = Kind::Committed;
            record.created_ns = now;
            record.updated_ns = now;
            record.labels = labels;
            record.usage = usage;
            snapshots.remove(key).db("remove active snapshot")?;
            snapshots
                .insert(name, encode(&record)?.as_slice())
                .db("write snapshot")?;
            Ok(record)
        })
    }

    /// Removes the record of `key`, which must have no children. `before_commit` runs
    /// inside the transaction once the removal is certain (to claim the directory
    /// before any cleanup can see it as an orphan).
    pub fn remove(
        &self,
        key: &str,
        before_commit: impl FnOnce(&Record),
    ) -> Result<Record, SnapshotError> {
        write(&self.db, |txn| {
            let mut snapshots = txn.open_table(SNAPSHOTS).db("open table")?;
            let mut children = txn.open_table(CHILDREN).db("open table")?;
            let record = get(&snapshots, key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            let has_child = children
                .range((record.id, 0)..=(record.id, u64::MAX))
                .db("read parent links")?
                .next()
                .is_some();
            if has_child {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children"
                )));
            }
            if let Some(parent) = &record.parent {
                if let Some(parent_record) = get(&snapshots, parent)? {
                    children
                        .remove((parent_record.id, record.id))
                        .db("remove parent link")?;
                }
            }
            snapshots.remove(key).db("remove snapshot")?;
            before_commit(&record);
            Ok(record)
        })
    }

    /// Changes the labels of `name` with `change`, and its update time.
    pub fn update_labels(
        &self,
        name: &str,
        change: impl FnOnce(&mut Labels) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        write(&self.db, |txn| {
            let mut snapshots = txn.open_table(SNAPSHOTS).db("open table")?;
            let mut record = get(&snapshots, name)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {name}")))?;
            change(&mut record.labels)?;
            record.updated_ns = now_ns();
            snapshots
                .insert(name, encode(&record)?.as_slice())
                .db("write snapshot")?;
            Ok(record)
        })
    }

    /// Runs `f` with the ids of all stored snapshots and the next id to be allocated,
    /// while holding the write lock, so that no snapshot is created or removed while
    /// `f` decides which directories are orphans.
    pub fn with_ids_locked<T>(
        &self,
        f: impl FnOnce(&std::collections::HashSet<u64>, u64) -> T,
    ) -> Result<T, SnapshotError> {
        let txn = self.db.begin_write().db("begin")?;
        let result = {
            let snapshots = txn.open_table(SNAPSHOTS).db("open table")?;
            let meta = txn.open_table(META).db("open table")?;
            let next = meta
                .get(NEXT_ID_KEY)
                .db("read next id")?
                .map_or(1, |v| v.value());
            let mut ids = std::collections::HashSet::new();
            for entry in snapshots.iter().db("scan snapshots")? {
                let (key, value) = entry.db("scan snapshots")?;
                ids.insert(decode(key.value(), value.value())?.id);
            }
            f(&ids, next)
        };
        txn.abort().db("abort")?;
        Ok(result)
    }
}

/// Runs `f` in one write transaction, committed if `f` succeeds; an error drops
/// the transaction, which aborts it.
fn write<T>(
    db: &Database,
    f: impl FnOnce(&redb::WriteTransaction) -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError> {
    let txn = db.begin_write().db("begin")?;
    let out = f(&txn)?;
    txn.commit().db("commit")?;
    Ok(out)
}

fn next_id(meta: &mut redb::Table<'_, &'static str, u64>) -> Result<u64, SnapshotError> {
    let id = meta
        .get(NEXT_ID_KEY)
        .db("read next id")?
        .map_or(1, |v| v.value());
    let following = id
        .checked_add(1)
        .ok_or_else(|| SnapshotError::Internal("snapshot ids exhausted".into()))?;
    meta.insert(NEXT_ID_KEY, following).db("write next id")?;
    Ok(id)
}
