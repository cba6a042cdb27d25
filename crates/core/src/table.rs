//! The table of known state. Devices: per key, per origin, the latest value with its
//! `(epoch, seq)`, timestamp and arrival time; the value shown for a device is the
//! [`aggregate`](crate::state::aggregate()) over origins, a down origin counting as the
//! policy's `down_state`. Presence: per key one last-writer-wins register, the newest write
//! by `(hlc timestamp, origin)`.
//!
//! Updates are merged per key by version, so the table converges whatever the order of
//! arrival (stream, snapshot, duplicates). A full-sync end sets a per-origin floor: device
//! entries of that origin older than the sync's begin are dropped (only when the whole sync
//! arrived, see [`crate::replica::Replica::ingest`]; else when a snapshot brings the floor),
//! and older ones arriving late are refused.
//!
//! A bounded change journal ([`Table::version`], [`Table::changes_since`]) names the keys
//! changed recently, so a status view can be refreshed for those keys only. It records
//! nothing until the first [`Table::changes_since`] call (tables nobody watches pay nothing).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};

use compact_str::CompactString;
use hashbrown::HashTable;

use crate::envelope::SnapshotEntry;
use crate::hlc::{HlcTimestamp, wins};
use crate::liveness::Origins;
use crate::state::{DeviceState, Kind, Presence, Value, aggregate};
use crate::time::{Epoch, Millis};

/// One origin's latest report of one device.
///
/// Compact (48 bytes): the origin is a private index into the table's list of origin names
/// (see [`DeviceEntries`] for the name), and the timestamp's two parts are fields of their
/// own (an [`HlcTimestamp`] has 4 bytes of padding), which leaves room for the key's mark and
/// tag. Equality compares the report (not the key's mark nor its tag, see
/// [`Table::mark_device`], [`Table::set_device_tag`]).
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    /// The state reported.
    pub value: DeviceState,
    /// Origin epoch of the report.
    pub epoch: Epoch,
    /// Stream sequence of the report.
    pub seq: u64,
    /// Its timestamp's wall part ([`DeviceEntry::ts`]).
    wall: u64,
    /// When it arrived here.
    pub updated: Millis,
    /// Its timestamp's counter.
    counter: u32,
    /// Index of the origin in the table's interned names.
    origin: u32,
    /// The key's tag (see [`Table::set_device_tag`]), the same in every entry of the key.
    tag: u32,
    /// The key's mark (see [`Table::mark_device`]), the same in every entry of the key (kept
    /// in the padding: no byte more per key).
    mark: bool,
}

impl DeviceEntry {
    /// Its timestamp.
    pub fn ts(&self) -> HlcTimestamp {
        HlcTimestamp {
            wall: self.wall,
            counter: self.counter,
        }
    }
}

impl PartialEq for DeviceEntry {
    fn eq(&self, o: &Self) -> bool {
        (
            self.value,
            self.epoch,
            self.seq,
            self.ts(),
            self.updated,
            self.origin,
        ) == (o.value, o.epoch, o.seq, o.ts(), o.updated, o.origin)
    }
}

impl Eq for DeviceEntry {}

/// The entries of one device key: one inline (the common case: a device is reported by
/// its own PBX only), or several, sorted by origin name.
#[derive(Clone, Debug)]
enum Slot {
    One(DeviceEntry),
    Many(Vec<DeviceEntry>),
}

impl Slot {
    fn as_slice(&self) -> &[DeviceEntry] {
        match self {
            Slot::One(e) => std::slice::from_ref(e),
            Slot::Many(v) => v,
        }
    }

    fn position(&self, origin: u32) -> Option<usize> {
        self.as_slice().iter().position(|e| e.origin == origin)
    }

    /// The key's mark (every entry holds it).
    fn mark(&self) -> bool {
        self.as_slice().first().is_some_and(|e| e.mark)
    }

    fn set_mark(&mut self) {
        self.each(|e| e.mark = true);
    }

    /// The key's tag (every entry holds it).
    fn tag(&self) -> u32 {
        self.as_slice().first().map_or(NO_TAG, |e| e.tag)
    }

    fn set_tag(&mut self, tag: u32) {
        self.each(|e| e.tag = tag);
    }

    fn each(&mut self, f: impl FnMut(&mut DeviceEntry)) {
        match self {
            Slot::One(e) => std::iter::once(e).for_each(f),
            Slot::Many(v) => v.iter_mut().for_each(f),
        }
    }

    /// Inserts `e` (whose origin is not present yet) keeping the entries sorted by name; it
    /// takes the key's mark and tag.
    fn insert(&mut self, names: &[Box<str>], mut e: DeviceEntry) {
        e.mark = self.mark();
        e.tag = self.tag();
        let name = |e: &DeviceEntry| &names[e.origin as usize];
        let mut v = match std::mem::replace(self, Slot::Many(Vec::new())) {
            Slot::One(first) => {
                let mut v = Vec::with_capacity(2);
                v.push(first);
                v
            }
            Slot::Many(v) => v,
        };
        let at = v.partition_point(|x| name(x) < name(&e));
        v.insert(at, e);
        *self = Slot::Many(v);
    }

    /// Removes the entry at `i`; returns whether the slot is now empty.
    fn remove(&mut self, i: usize) -> bool {
        match self {
            Slot::One(_) => true,
            Slot::Many(v) => {
                v.remove(i);
                if v.len() == 1 {
                    let e = v.pop().expect("one entry left");
                    *self = Slot::One(e);
                } else if v.is_empty() {
                    return true;
                }
                false
            }
        }
    }
}

/// The per-origin entries of one device key (see [`Table::device`]), sorted by origin name.
#[derive(Clone, Copy)]
pub struct DeviceEntries<'a> {
    names: &'a [Box<str>],
    entries: &'a [DeviceEntry],
}

impl<'a> DeviceEntries<'a> {
    /// The entry of `origin`.
    pub fn get(&self, origin: &str) -> Option<&'a DeviceEntry> {
        self.iter().find(|(o, _)| *o == origin).map(|(_, e)| e)
    }

    /// Whether `origin` reports the key.
    pub fn contains(&self, origin: &str) -> bool {
        self.get(origin).is_some()
    }

    /// Every `(origin, entry)`, by origin name.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a DeviceEntry)> + use<'a> {
        let names = self.names;
        self.entries
            .iter()
            .map(move |e| (&*names[e.origin as usize], e))
    }

    /// Number of origins reporting the key (at least one).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false (a key without entries is not in the table); for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl std::fmt::Debug for DeviceEntries<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// How [`Table::apply_settling`] aggregates the key it changed: see [`Table::aggregate`].
#[derive(Clone, Copy, Debug)]
pub struct Settle<'a> {
    /// Liveness: a down origin counts as `down_state`.
    pub origins: &'a Origins,
    /// What a down origin's entry counts as.
    pub down_state: DeviceState,
    /// The origin left out (the node's own).
    pub exclude: Option<&'a str>,
}

/// What [`Table::apply_settling`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Whether the table changed ([`Table::apply`]'s result).
    pub changed: bool,
    /// A device entry changed and settling was asked: the key's
    /// [`Table::aggregate_and_mark`].
    pub settled: Option<Settled>,
}

/// A device key's aggregate ([`Table::aggregate_and_mark`]) and the key's tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    /// The aggregate.
    pub state: DeviceState,
    /// The key's tag ([`Table::set_device_tag`]; [`NO_TAG`] when the table no longer holds
    /// the key).
    pub tag: u32,
}

/// The tag of a device key whose owner set none ([`Table::set_device_tag`]).
pub const NO_TAG: u32 = u32::MAX;

/// [`Table::aggregate_and_mark`] of the entries in `slot`.
fn settle_slot(names: &[Box<str>], slot: &mut Slot, s: &Settle<'_>) -> Option<Settled> {
    let mut states = slot
        .as_slice()
        .iter()
        .map(|e| (&*names[e.origin as usize], e.value))
        .filter(|(o, _)| !s.exclude.is_some_and(|x| same(x, o)))
        .map(|(o, v)| {
            if s.origins.is_down(o) {
                s.down_state
            } else {
                v
            }
        })
        .peekable();
    let state = if states.peek().is_some() {
        let state = aggregate(states);
        slot.set_mark();
        state
    } else if slot.mark() {
        aggregate(std::iter::empty())
    } else {
        return None;
    };
    Some(Settled {
        state,
        tag: slot.tag(),
    })
}

/// The winning write of one presence key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    /// The presence.
    pub value: Presence,
    /// Who wrote it.
    pub origin: String,
    /// Writer's epoch.
    pub epoch: Epoch,
    /// Stream sequence of the write.
    pub seq: u64,
    /// Its timestamp (orders writes).
    pub ts: HlcTimestamp,
    /// When it arrived here.
    pub updated: Millis,
}

/// Keys the journal remembers at most; a reader further behind rebuilds from the table.
pub const JOURNAL_CAP: usize = 16_384;

/// The change journal: the keys of the last changes, oldest first.
#[derive(Debug, Default)]
struct Journal {
    /// Set by the first reader; until then nothing is recorded.
    on: AtomicBool,
    /// Version of the first key in `keys`.
    base: u64,
    keys: VecDeque<CompactString>,
}

impl Clone for Journal {
    fn clone(&self) -> Self {
        Journal {
            on: AtomicBool::new(self.on.load(Ordering::Relaxed)),
            base: self.base,
            keys: self.keys.clone(),
        }
    }
}

impl Journal {
    fn record(&mut self, key: &str) {
        if !self.on.load(Ordering::Relaxed) {
            self.base += 1;
            return;
        }
        if self.keys.len() >= JOURNAL_CAP {
            self.keys.pop_front();
            self.base += 1;
        }
        self.keys.push_back(key.into());
    }

    fn version(&self) -> u64 {
        self.base + self.keys.len() as u64
    }
}

/// The table of known state.
///
/// Layout (per device key with one origin, 100,000 keys of 13 bytes filled in order,
/// `tests/key_memory.rs`: 79 bytes requested while they arrive, 74 once packed, see
/// [`Table::compact`]): a B-tree from the key to its entries, one of them inline. The key is a [`CompactString`],
/// stored once: up to 24 bytes inline in the tree's node, without a block of its own. Origin
/// names are interned once per table (entries hold a `u32` index). The change journal and the
/// marked keys no longer in the table hold their keys the same way. A B-tree rather than a
/// hash map: iteration is sorted, and [`Table::device_range`] resumes after any key even while
/// the table changes, which lets a snapshot be streamed from a cursor.
#[derive(Clone, Debug, Default)]
pub struct Table {
    devices: BTreeMap<DevKey, Slot>,
    /// Interned origin names; never shrinks (bounded by the origins ever heard).
    names: Vec<Box<str>>,
    /// Indexes in `names`, by the hash of the name, compared inline.
    ids: HashTable<u32>,
    /// Hashes origin names (foldhash, seeded per process: names of authenticated peers).
    hasher: foldhash::fast::RandomState,
    presence: BTreeMap<String, PresenceEntry>,
    /// Per interned origin (by index): where its last full sync began.
    floors: Vec<Option<(Epoch, u64)>>,
    journal: Journal,
    /// Marked device keys no longer in `devices` (see [`Table::mark_device`]).
    marked_gone: BTreeSet<CompactString>,
    /// Device keys at the last [`Table::compact`].
    packed_len: usize,
}

/// A device key in [`Table`]'s B-tree: the name (inline up to 24 bytes), ordered like `str`
/// (bytewise) but compared without a call to `memcmp`, eight bytes at a time: most of a
/// received update's lookup was spent calling `memcmp` on keys like `PJSIP/b3n517`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DevKey(CompactString);

impl Ord for DevKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        cmp_bytes(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl PartialOrd for DevKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The same order, equality and hash as the name's: lookups by `&str` (keys longer than a
/// probe holds, ranges) find what lookups by [`DevKey`] find.
impl std::borrow::Borrow<str> for DevKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for DevKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// `a == b`, inline (without a call to `memcmp`): origin names are short.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && cmp_bytes(a.as_bytes(), b.as_bytes()).is_eq()
}

/// `a.cmp(b)` of byte strings (lexicographic, then shorter first), inline.
fn cmp_bytes(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_be_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            return x.cmp(&y);
        }
        i += 8;
    }
    while i < n {
        if a[i] != b[i] {
            return a[i].cmp(&b[i]);
        }
        i += 1;
    }
    a.len().cmp(&b.len())
}

/// The slot of device `key`: looked up with the inline comparison when the name fits a
/// [`CompactString`] inline (no allocation for the probe), else by `&str`.
fn slot<'a>(devices: &'a BTreeMap<DevKey, Slot>, key: &str) -> Option<&'a Slot> {
    if key.len() <= MAX_INLINE {
        devices.get(&DevKey(CompactString::new(key)))
    } else {
        devices.get(key)
    }
}

/// [`slot`], mutable.
fn slot_mut<'a>(devices: &'a mut BTreeMap<DevKey, Slot>, key: &str) -> Option<&'a mut Slot> {
    if key.len() <= MAX_INLINE {
        devices.get_mut(&DevKey(CompactString::new(key)))
    } else {
        devices.get_mut(key)
    }
}

/// Bytes a [`CompactString`] holds inline (on 64-bit targets; on others a longer probe
/// allocates, which is only slower).
const MAX_INLINE: usize = 24;

/// Device keys from which a table packs its B-tree each time their number grew by a quarter (see
/// [`Table::compact`]).
const COMPACT_FROM: usize = 4_096;

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Table::default()
    }

    fn origin_id(&mut self, origin: &str) -> u32 {
        if let Some(id) = self.id(origin) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("fewer than 2^32 origins");
        self.names.push(origin.into());
        let (names, hasher) = (&self.names, &self.hasher);
        self.ids.insert_unique(hasher.hash_one(origin), id, |&i| {
            hasher.hash_one(&*names[i as usize])
        });
        id
    }

    /// The index of `origin` in the interned names, if it is there.
    fn id(&self, origin: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(origin);
        self.ids
            .find(hash, |&i| same(&self.names[i as usize], origin))
            .copied()
    }

    /// Merges an update of `key` by `origin`. Returns whether the table changed.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        origin: &str,
        epoch: Epoch,
        seq: u64,
        key: &str,
        value: &Value,
        ts: HlcTimestamp,
        now: Millis,
    ) -> bool {
        self.apply_settling(origin, epoch, seq, key, value, ts, now, None)
            .changed
    }

    /// [`Table::apply`], and with `settle`, when a device entry changed: the key's
    /// [`Table::aggregate_and_mark`] in the same lookup (what a node then writes).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_settling(
        &mut self,
        origin: &str,
        epoch: Epoch,
        seq: u64,
        key: &str,
        value: &Value,
        ts: HlcTimestamp,
        now: Millis,
        settle: Option<Settle<'_>>,
    ) -> Applied {
        const UNCHANGED: Applied = Applied {
            changed: false,
            settled: None,
        };
        match value {
            Value::Device(state) => {
                let id = self.origin_id(origin);
                if self
                    .floors
                    .get(id as usize)
                    .copied()
                    .flatten()
                    .is_some_and(|f| (epoch, seq) < f)
                {
                    return UNCHANGED;
                }
                let entry = DeviceEntry {
                    value: *state,
                    epoch,
                    seq,
                    wall: ts.wall,
                    updated: now,
                    counter: ts.counter,
                    origin: id,
                    tag: NO_TAG,
                    mark: false,
                };
                let settled = match slot_mut(&mut self.devices, key) {
                    None => {
                        let mark = !self.marked_gone.is_empty() && self.marked_gone.remove(key);
                        self.devices
                            .insert(DevKey(key.into()), Slot::One(DeviceEntry { mark, ..entry }));
                        // Amortised O(1) per key (about five moves per key): of keys
                        // streamed in order, at most a fifth wait unpacked.
                        if self.devices.len() >= COMPACT_FROM.max(self.packed_len / 4 * 5) {
                            self.compact();
                        }
                        // A new key: looked up again (rare; the common update is below).
                        settle.and_then(|s| {
                            self.aggregate_and_mark(key, s.origins, s.down_state, s.exclude)
                        })
                    }
                    Some(slot) => {
                        match slot.position(id) {
                            Some(i) => {
                                let cur = match slot {
                                    Slot::One(e) => e,
                                    Slot::Many(v) => &mut v[i],
                                };
                                if (cur.epoch, cur.seq) >= (epoch, seq) {
                                    return UNCHANGED;
                                }
                                *cur = DeviceEntry {
                                    mark: cur.mark,
                                    tag: cur.tag,
                                    ..entry
                                };
                            }
                            None => slot.insert(&self.names, entry),
                        }
                        settle.and_then(|s| settle_slot(&self.names, slot, &s))
                    }
                };
                self.journal.record(key);
                Applied {
                    changed: true,
                    settled,
                }
            }
            Value::Presence(p) => {
                if let Some(cur) = self.presence.get_mut(key)
                    && !wins(ts, origin, cur.ts, &cur.origin)
                {
                    // The same write republished in a newer (epoch, seq): refresh its version.
                    if cur.origin == origin && cur.ts == ts && (epoch, seq) > (cur.epoch, cur.seq) {
                        cur.epoch = epoch;
                        cur.seq = seq;
                    }
                    return UNCHANGED;
                }
                self.journal.record(key);
                self.presence.insert(
                    key.to_owned(),
                    PresenceEntry {
                        value: p.clone(),
                        origin: origin.to_owned(),
                        epoch,
                        seq,
                        ts,
                        updated: now,
                    },
                );
                Applied {
                    changed: true,
                    settled: None,
                }
            }
        }
    }

    /// Ends a full sync of `origin` that began at `(epoch, begin_seq)`: drops that origin's
    /// device entries older than the begin and refuses older ones from now on. Returns the
    /// keys dropped.
    pub fn end_full_sync(&mut self, origin: &str, epoch: Epoch, begin_seq: u64) -> Vec<String> {
        self.raise_floor(origin, epoch, begin_seq);
        let floor = (epoch, begin_seq);
        let mut dropped = Vec::new();
        let Some(id) = self.id(origin) else {
            return dropped;
        };
        let gone = &mut self.marked_gone;
        self.devices.retain(|key, slot| match slot.position(id) {
            Some(i) if (slot.as_slice()[i].epoch, slot.as_slice()[i].seq) < floor => {
                dropped.push(key.to_string());
                let mark = slot.mark();
                let empty = slot.remove(i);
                if empty && mark {
                    gone.insert(key.0.clone());
                }
                !empty
            }
            _ => true,
        });
        for k in &dropped {
            self.journal.record(k);
        }
        dropped
    }

    /// Refuses device entries of `origin` older than `(epoch, begin_seq)` from now on (a full
    /// sync that began there ended), without dropping those held: see
    /// [`Table::end_full_sync`].
    pub fn raise_floor(&mut self, origin: &str, epoch: Epoch, begin_seq: u64) {
        let floor = (epoch, begin_seq);
        let id = self.origin_id(origin) as usize;
        if self.floors.len() <= id {
            self.floors.resize(id + 1, None);
        }
        let f = self.floors[id].get_or_insert(floor);
        if floor > *f {
            *f = floor;
        }
    }

    /// Where `origin`'s last full sync began (its entries older than that are refused).
    pub fn floor(&self, origin: &str) -> Option<(Epoch, u64)> {
        let id = self.id(origin)?;
        self.floors.get(id as usize).copied().flatten()
    }

    /// Number of changes so far (device entries written or dropped, presence winners
    /// replaced); see [`Table::changes_since`].
    pub fn version(&self) -> u64 {
        self.journal.version()
    }

    /// The keys (device or presence, in order, possibly repeated) changed after `version`
    /// (a value of [`Table::version`]); `None` when the journal no longer reaches that far
    /// back (more than [`JOURNAL_CAP`] changes since, or `version` taken before the first call
    /// of this method switched the journal on): then look at every key. The first call
    /// returns `None` unless `version` is the current one.
    pub fn changes_since(&self, version: u64) -> Option<impl Iterator<Item = &str>> {
        self.journal.on.store(true, Ordering::Relaxed);
        let j = &self.journal;
        let skip = version.checked_sub(j.base)?;
        let skip = usize::try_from(skip).ok().filter(|s| *s <= j.keys.len())?;
        Some(j.keys.range(skip..).map(|k| &**k))
    }

    fn entries<'a>(&'a self, slot: &'a Slot) -> DeviceEntries<'a> {
        DeviceEntries {
            names: &self.names,
            entries: slot.as_slice(),
        }
    }

    /// The per-origin entries of device `key`.
    pub fn device(&self, key: &str) -> Option<DeviceEntries<'_>> {
        slot(&self.devices, key).map(|s| self.entries(s))
    }

    /// Device keys with their entries, in key order, starting after `after` (from the first
    /// key when `None`): a cursor that stays valid while the table changes.
    pub fn device_range<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a str, DeviceEntries<'a>)> + 'a {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        self.devices
            .range::<str, _>((lower, Bound::Unbounded))
            .map(|(k, s)| (&**k, self.entries(s)))
    }

    /// Presence keys with their winners, in key order, starting after `after`.
    pub fn presence_range<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a str, &'a PresenceEntry)> + 'a {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        self.presence
            .range::<str, _>((lower, Bound::Unbounded))
            .map(|(k, e)| (k.as_str(), e))
    }

    /// The aggregate state of device `key` over every origin but `exclude`, a down origin
    /// counting as `down_state`; `None` when no such origin reports the key.
    pub fn aggregate(
        &self,
        key: &str,
        origins: &Origins,
        down_state: DeviceState,
        exclude: Option<&str>,
    ) -> Option<DeviceState> {
        let per_origin = self.device(key)?;
        let mut states = per_origin
            .iter()
            .filter(|(o, _)| Some(*o) != exclude)
            .map(|(o, e)| {
                if origins.is_down(o) {
                    down_state
                } else {
                    e.value
                }
            })
            .peekable();
        states.peek()?;
        Some(aggregate(states))
    }

    /// [`Table::aggregate`] of device `key`, marking the key ([`Table::mark_device`]) when
    /// there is one, in one lookup: what a node writes for `key`. Without an aggregate (no
    /// origin but `exclude` reports the key), the aggregate of no device if the key was
    /// marked before (it was written and must be withdrawn), else `None`. With the key's tag
    /// ([`Table::set_device_tag`]).
    pub fn aggregate_and_mark(
        &mut self,
        key: &str,
        origins: &Origins,
        down_state: DeviceState,
        exclude: Option<&str>,
    ) -> Option<Settled> {
        let Some(slot) = slot_mut(&mut self.devices, key) else {
            return self.marked_gone.contains(key).then(|| Settled {
                state: aggregate(std::iter::empty()),
                tag: NO_TAG,
            });
        };
        let settle = Settle {
            origins,
            down_state,
            exclude,
        };
        settle_slot(&self.names, slot, &settle)
    }

    /// The winning write of presence `key`.
    pub fn presence(&self, key: &str) -> Option<&PresenceEntry> {
        self.presence.get(key)
    }

    /// Packs the device map's B-tree nodes. Keys that arrive in order (a snapshot streams them
    /// sorted) leave the nodes a little over half full: a full node splits in the middle and
    /// the next keys go to its right half. Rebuilding from the sorted entries (without a copy
    /// of them: `append` merges two maps into full nodes) fills them; O(keys). The table
    /// also packs itself whenever its number of device keys has grown by a quarter since the
    /// last time (from 4,096 keys on): keys streamed in order cost about 79 bytes each as
    /// they arrive instead of 96 when packing at each doubling (`tests/key_memory.rs`).
    pub fn compact(&mut self) {
        self.packed_len = self.devices.len();
        let Some((key, slot)) = self.devices.pop_first() else {
            return;
        };
        let mut packed = BTreeMap::new();
        packed.insert(key, slot);
        packed.append(&mut self.devices);
        self.devices = packed;
    }

    /// Marks device `key` (the node marks the keys it applied), whether or not the table
    /// holds it. A mark costs no memory while the key is in the table and outlives the key's
    /// entries (see [`Table::marked_gone`]); it is never cleared.
    pub fn mark_device(&mut self, key: &str) {
        match slot_mut(&mut self.devices, key) {
            Some(slot) => slot.set_mark(),
            None => {
                if !self.marked_gone.contains(key) {
                    self.marked_gone.insert(key.into());
                }
            }
        }
    }

    /// Sets the tag of device `key` (when the table holds it): a number the table's owner
    /// keeps with the key, handed back with the key's aggregate ([`Settled::tag`]) at no
    /// lookup of its own. A node keeps there the apply queue's id of the key's target. It
    /// stays while the key is in the table (whatever its entries do); a key dropped and
    /// reported again starts with [`NO_TAG`]. (Kept in the entries' padding: no byte more
    /// per key.)
    pub fn set_device_tag(&mut self, key: &str, tag: u32) {
        if let Some(slot) = slot_mut(&mut self.devices, key) {
            slot.set_tag(tag);
        }
    }

    /// The tag of device `key` ([`Table::set_device_tag`]), if the table holds the key.
    pub fn device_tag(&self, key: &str) -> Option<u32> {
        slot(&self.devices, key).map(Slot::tag)
    }

    /// Whether device `key` was marked ([`Table::mark_device`]).
    pub fn is_marked(&self, key: &str) -> bool {
        match slot(&self.devices, key) {
            Some(slot) => slot.mark(),
            None => self.marked_gone.contains(key),
        }
    }

    /// The marked device keys the table no longer holds, in order.
    pub fn marked_gone(&self) -> impl Iterator<Item = &str> {
        self.marked_gone.iter().map(|k| &**k)
    }

    /// Every device key, in order.
    pub fn device_keys(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(|k| &**k)
    }

    /// Every presence key with its winner.
    pub fn presence_entries(&self) -> impl Iterator<Item = (&String, &PresenceEntry)> {
        self.presence.iter()
    }

    /// The device keys `origin` reports.
    pub fn device_keys_of(&self, origin: &str) -> Vec<String> {
        let Some(id) = self.id(origin) else {
            return Vec::new();
        };
        self.devices
            .iter()
            .filter(|(_, s)| s.position(id).is_some())
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// The snapshot entry of one device entry.
    pub fn device_snapshot_entry(key: &str, origin: &str, e: &DeviceEntry) -> SnapshotEntry {
        SnapshotEntry {
            origin: origin.to_owned(),
            epoch: e.epoch,
            seq: e.seq,
            key: key.to_owned(),
            value: Value::Device(e.value),
            ts: e.ts(),
        }
    }

    /// The snapshot entry of one presence winner.
    pub fn presence_snapshot_entry(key: &str, e: &PresenceEntry) -> SnapshotEntry {
        SnapshotEntry {
            origin: e.origin.clone(),
            epoch: e.epoch,
            seq: e.seq,
            key: key.to_owned(),
            value: Value::Presence(e.value.clone()),
            ts: e.ts,
        }
    }

    /// Every entry, for a snapshot (devices by key then origin, then presence by key). A
    /// hub streams its answer with [`Table::device_range`] instead.
    pub fn snapshot(&self) -> Vec<SnapshotEntry> {
        let mut out = Vec::new();
        for (key, per_origin) in self.device_range(None) {
            for (origin, e) in per_origin.iter() {
                out.push(Table::device_snapshot_entry(key, origin, e));
            }
        }
        for (key, e) in &self.presence {
            out.push(Table::presence_snapshot_entry(key, e));
        }
        out
    }

    /// Number of `(kind, key, origin)` entries.
    pub fn len(&self) -> usize {
        self.devices
            .values()
            .map(|s| s.as_slice().len())
            .sum::<usize>()
            + self.presence.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.presence.is_empty()
    }

    /// Number of keys of `kind`.
    pub fn keys(&self, kind: Kind) -> usize {
        match kind {
            Kind::Device => self.devices.len(),
            Kind::Presence => self.presence.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeviceState::*;
    use crate::state::PresenceStatus;

    fn ts(w: u64) -> HlcTimestamp {
        HlcTimestamp {
            wall: w,
            counter: 0,
        }
    }

    fn dev(t: &mut Table, o: &str, e: u64, s: u64, k: &str, v: DeviceState) -> bool {
        t.apply(o, Epoch(e), s, k, &Value::Device(v), ts(s), Millis(0))
    }

    #[test]
    fn device_keys_compare_as_str_does() {
        use proptest::prelude::*;
        let short =
            proptest::collection::vec(prop_oneof![Just(b'P'), Just(0u8), any::<u8>()], 0..20);
        proptest!(ProptestConfig::with_cases(2_000), |(a in short.clone(), b in short)| {
            prop_assert_eq!(cmp_bytes(&a, &b), a.cmp(&b));
            let mut c = a.clone();
            c.extend_from_slice(&b);
            prop_assert_eq!(cmp_bytes(&a, &c), a.cmp(&c));
            prop_assert_eq!(cmp_bytes(&c, &a), c.cmp(&a));
            if let (Ok(x), Ok(y)) = (std::str::from_utf8(&a), std::str::from_utf8(&b)) {
                prop_assert_eq!(same(x, y), x == y);
                prop_assert!(same(x, x));
            }
        });
        // Lookups of short (probe) and long (`&str`) keys find the same entries.
        let mut t = Table::new();
        let long = "PJSIP/a-device-name-longer-than-24-bytes";
        for k in [
            "PJSIP/b1n1",
            "PJSIP/b1n10",
            "PJSIP/b1n2",
            long,
            "",
            "PJSIP/b1n1\0",
        ] {
            assert!(dev(&mut t, "a", 1, 1, k, Inuse), "{k:?}");
        }
        for k in [
            "PJSIP/b1n1",
            "PJSIP/b1n10",
            "PJSIP/b1n2",
            long,
            "",
            "PJSIP/b1n1\0",
        ] {
            assert!(t.device(k).is_some(), "{k:?}");
        }
        assert!(t.device("PJSIP/b1n3").is_none());
        let keys: Vec<&str> = t.device_keys().collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn newest_version_per_origin_wins_in_any_order() {
        let mut t = Table::new();
        assert!(dev(&mut t, "a", 1, 2, "d", Inuse));
        assert!(!dev(&mut t, "a", 1, 1, "d", NotInuse), "older seq");
        assert!(!dev(&mut t, "a", 1, 2, "d", NotInuse), "same seq");
        assert!(dev(&mut t, "a", 2, 1, "d", Busy), "newer epoch");
        assert!(dev(&mut t, "b", 1, 1, "d", Ringing));
        let o = Origins::new(1000);
        assert_eq!(t.aggregate("d", &o, Unavailable, None), Some(Ringinuse));
        assert_eq!(t.aggregate("d", &o, Unavailable, Some("b")), Some(Busy));
        assert_eq!(
            t.aggregate("d", &o, Unavailable, Some("x")),
            Some(Ringinuse)
        );
        assert_eq!(t.aggregate("zz", &o, Unavailable, None), None);
        let mut t2 = Table::new();
        assert!(dev(&mut t2, "a", 1, 1, "d", Inuse));
        assert_eq!(t2.aggregate("d", &o, Unavailable, Some("a")), None);
    }

    #[test]
    fn down_origins_count_as_down_state() {
        let mut t = Table::new();
        dev(&mut t, "a", 1, 1, "d", Inuse);
        dev(&mut t, "b", 1, 1, "d", NotInuse);
        let mut o = Origins::new(10);
        o.observe("a", Epoch(1), 1, false, Millis(0));
        o.observe("b", Epoch(1), 1, false, Millis(100));
        assert_eq!(t.aggregate("d", &o, Unavailable, None), Some(Inuse));
        o.expire(Millis(50));
        assert_eq!(t.aggregate("d", &o, Unavailable, None), Some(NotInuse));
        assert_eq!(
            t.aggregate("d", &o, Unavailable, Some("b")),
            Some(Unavailable)
        );
    }

    #[test]
    fn full_sync_end_drops_unreported_keys_and_refuses_late_old_ones() {
        let mut t = Table::new();
        dev(&mut t, "a", 1, 1, "gone", Inuse);
        dev(&mut t, "a", 1, 2, "kept", Inuse);
        dev(&mut t, "b", 1, 1, "gone", Busy);
        // Full sync begins at seq 3 and reports only "kept".
        dev(&mut t, "a", 1, 4, "kept", NotInuse);
        assert_eq!(t.end_full_sync("a", Epoch(1), 3), vec!["gone".to_owned()]);
        assert!(t.device("gone").unwrap().get("a").is_none());
        assert!(t.device("gone").unwrap().get("b").is_some());
        assert!(!dev(&mut t, "a", 1, 2, "late", Inuse), "below the floor");
        assert!(dev(&mut t, "a", 1, 5, "late", Inuse));
        t.end_full_sync("b", Epoch(1), 9);
        assert!(t.device("gone").is_none(), "empty keys disappear");
    }

    #[test]
    fn merge_order_does_not_matter() {
        use proptest::prelude::*;
        let states = [Inuse, NotInuse, Busy, Ringing, Unavailable];
        proptest!(ProptestConfig::with_cases(200), |(
            ups in proptest::collection::vec((0..3usize, 1..3u64, 1..20u64, 0..3usize, 0..5usize, any::<bool>()), 1..40),
            seed in any::<u64>(),
        )| {
            // One (origin, epoch, seq) is one message: keep the first of each.
            let mut seen = std::collections::BTreeSet::new();
            let ups: Vec<_> = ups.into_iter().filter(|u| seen.insert((u.0, u.1, u.2))).collect();
            let build = |order: &[usize]| {
                let mut t = Table::new();
                for &i in order {
                    let (o, e, s, k, st, pres) = ups[i];
                    let origin = format!("o{o}");
                    let key = format!("k{k}");
                    let v = if pres {
                        Value::Presence(Presence::new(PresenceStatus::ALL[st], "", ""))
                    } else {
                        Value::Device(states[st])
                    };
                    t.apply(&origin, Epoch(e), s, &key, &v, ts(s * 10 + e), Millis(0));
                }
                t.snapshot()
            };
            let order: Vec<usize> = (0..ups.len()).collect();
            let mut shuffled = order.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(build(&order), build(&shuffled));
        });
    }

    #[test]
    fn presence_is_last_writer_wins_with_origin_tiebreak() {
        let mut t = Table::new();
        let p = |s| Value::Presence(Presence::new(s, "", ""));
        assert!(t.apply(
            "a",
            Epoch(1),
            1,
            "CustomPresence:x",
            &p(PresenceStatus::Dnd),
            ts(5),
            Millis(0)
        ));
        assert!(!t.apply(
            "b",
            Epoch(1),
            1,
            "CustomPresence:x",
            &p(PresenceStatus::Away),
            ts(4),
            Millis(0)
        ));
        assert!(
            t.apply(
                "b",
                Epoch(1),
                2,
                "CustomPresence:x",
                &p(PresenceStatus::Away),
                ts(5),
                Millis(0)
            ),
            "tie: b > a"
        );
        assert!(!t.apply(
            "a",
            Epoch(1),
            2,
            "CustomPresence:x",
            &p(PresenceStatus::Xa),
            ts(5),
            Millis(0)
        ));
        let w = t.presence("CustomPresence:x").unwrap();
        assert_eq!(
            (w.origin.as_str(), w.value.status),
            ("b", PresenceStatus::Away)
        );
        // Full syncs never touch presence.
        t.end_full_sync("b", Epoch(1), 100);
        assert!(t.presence("CustomPresence:x").is_some());
        assert_eq!(t.snapshot().len(), 1);
    }

    #[test]
    fn journal_names_changed_keys_once_switched_on() {
        let mut t = Table::new();
        dev(&mut t, "a", 1, 1, "d1", Inuse);
        let v0 = t.version();
        assert_eq!(v0, 1, "changes are counted before anyone reads");
        assert!(
            t.changes_since(0).is_none(),
            "nothing recorded before the first read"
        );
        assert_eq!(t.changes_since(v0).map(Iterator::count), Some(0));
        dev(&mut t, "a", 1, 2, "d2", Busy);
        dev(&mut t, "a", 1, 1, "d2", Inuse); // older: refused, not a change
        dev(&mut t, "b", 1, 1, "d1", Ringing);
        let got: Vec<&str> = t.changes_since(v0).expect("journal reaches back").collect();
        assert_eq!(got, ["d2", "d1"]);
        let v1 = t.version();
        assert_eq!(v1, v0 + 2);
        t.end_full_sync("a", Epoch(1), 3);
        let got: Vec<&str> = t.changes_since(v1).expect("journal reaches back").collect();
        assert_eq!(got, ["d1", "d2"], "dropped entries are changes too");
        assert!(t.changes_since(t.version() + 1).is_none());
    }

    #[test]
    fn journal_overflow_asks_for_a_full_look() {
        let mut t = Table::new();
        let v0 = t.version();
        assert!(t.changes_since(v0).is_some());
        for i in 0..=JOURNAL_CAP as u64 {
            dev(&mut t, "a", 1, i + 1, &format!("d{i}"), Inuse);
        }
        assert!(t.changes_since(v0).is_none(), "too far behind");
        let recent: Vec<&str> = t
            .changes_since(t.version() - 1)
            .expect("recent changes kept")
            .collect();
        assert_eq!(recent, [format!("d{JOURNAL_CAP}").as_str()]);
    }

    #[test]
    fn a_mark_follows_the_key_through_its_entries_and_outlives_them() {
        assert_eq!(
            std::mem::size_of::<DeviceEntry>(),
            48,
            "the mark and the tag take no byte"
        );
        let mut t = Table::new();
        dev(&mut t, "a", 1, 1, "d", Inuse);
        dev(&mut t, "a", 1, 2, "e", Inuse);
        assert!(!t.is_marked("d"));
        t.mark_device("d");
        assert!(t.is_marked("d") && !t.is_marked("e"));
        // A newer report, a second origin, then the first origin's entry dropped.
        dev(&mut t, "a", 1, 3, "d", Busy);
        dev(&mut t, "b", 1, 1, "d", NotInuse);
        assert!(t.is_marked("d"));
        t.end_full_sync("a", Epoch(2), 1);
        assert!(t.is_marked("d") && t.device("d").is_some());
        assert_eq!(t.marked_gone().count(), 0);
        // Every entry gone: the mark stays; unmarked "e" leaves nothing behind.
        t.end_full_sync("b", Epoch(2), 1);
        assert!(t.device("d").is_none() && t.is_marked("d") && !t.is_marked("e"));
        assert_eq!(t.marked_gone().collect::<Vec<_>>(), vec!["d"]);
        // Reported again: the mark is back in the entry.
        dev(&mut t, "c", 1, 1, "d", Inuse);
        assert!(t.is_marked("d"));
        assert_eq!(t.marked_gone().count(), 0);
        // A key never in the table can be marked too.
        t.mark_device("x");
        assert!(t.is_marked("x"));
        assert_eq!(t.marked_gone().collect::<Vec<_>>(), vec!["x"]);
    }

    #[test]
    fn a_tag_follows_the_key_through_its_entries_and_goes_with_it() {
        let o = Origins::new(1000);
        let mut t = Table::new();
        assert_eq!(t.device_tag("d"), None);
        t.set_device_tag("d", 7);
        assert_eq!(t.device_tag("d"), None, "no key, no tag");
        dev(&mut t, "b", 1, 1, "d", Inuse);
        assert_eq!(t.device_tag("d"), Some(NO_TAG), "a new key has none");
        t.set_device_tag("d", 7);
        // A newer report, origins before and after the first one, a key beside it, packing.
        dev(&mut t, "b", 1, 2, "d", Busy);
        dev(&mut t, "a", 1, 1, "d", NotInuse);
        dev(&mut t, "c", 1, 1, "d", NotInuse);
        dev(&mut t, "a", 1, 2, "e", Inuse);
        t.compact();
        assert_eq!(
            (t.device_tag("d"), t.device_tag("e")),
            (Some(7), Some(NO_TAG))
        );
        let settled = t.aggregate_and_mark("d", &o, Unavailable, Some("c"));
        assert_eq!(
            settled,
            Some(Settled {
                state: Busy,
                tag: 7
            })
        );
        let applied = t.apply_settling(
            "a",
            Epoch(1),
            3,
            "d",
            &Value::Device(Ringing),
            ts(3),
            Millis(0),
            Some(Settle {
                origins: &o,
                down_state: Unavailable,
                exclude: None,
            }),
        );
        assert_eq!(
            applied.settled.map(|s| (s.state, s.tag)),
            Some((Ringinuse, 7))
        );
        assert_eq!(t.device("d").unwrap().get("b").unwrap().ts(), ts(2));
        // Entries dropped one by one: the tag stays while one is left.
        t.end_full_sync("a", Epoch(2), 1);
        t.end_full_sync("b", Epoch(2), 1);
        assert_eq!(t.device_tag("d"), Some(7));
        // Gone: a marked key settles without a tag, and comes back without one.
        t.end_full_sync("c", Epoch(2), 1);
        assert_eq!(t.device_tag("d"), None);
        let gone = t.aggregate_and_mark("d", &o, Unavailable, None);
        assert_eq!(gone.map(|s| s.tag), Some(NO_TAG));
        dev(&mut t, "x", 1, 1, "d", Inuse);
        assert_eq!(t.device_tag("d"), Some(NO_TAG));
        // Equality of entries compares reports, not tags.
        let mut u = t.clone();
        u.set_device_tag("d", 1);
        assert_eq!(
            t.device("d").unwrap().get("x"),
            u.device("d").unwrap().get("x")
        );
    }

    #[test]
    fn several_origins_per_key_stay_sorted_and_shrink_back_to_one() {
        let mut t = Table::new();
        assert!(dev(&mut t, "c", 1, 1, "d", Inuse));
        assert!(dev(&mut t, "a", 1, 1, "d", Busy));
        assert!(dev(&mut t, "b", 1, 1, "d", Ringing));
        let names: Vec<&str> = t.device("d").unwrap().iter().map(|(o, _)| o).collect();
        assert_eq!(
            names,
            ["a", "b", "c"],
            "sorted by origin name, not by arrival"
        );
        assert_eq!(t.device("d").unwrap().len(), 3);
        assert_eq!(t.device("d").unwrap().get("b").unwrap().value, Ringing);
        assert!(!t.device("d").unwrap().contains("x"));
        assert!(
            dev(&mut t, "b", 1, 2, "d", NotInuse),
            "update in the middle"
        );
        assert_eq!(t.device("d").unwrap().get("b").unwrap().seq, 2);
        assert_eq!(t.len(), 3);
        assert_eq!(t.device_keys_of("b"), ["d"]);
        assert!(t.device_keys_of("nobody").is_empty());
        t.end_full_sync("a", Epoch(1), 5);
        t.end_full_sync("c", Epoch(1), 5);
        let left: Vec<(&str, DeviceState)> = t
            .device("d")
            .unwrap()
            .iter()
            .map(|(o, e)| (o, e.value))
            .collect();
        assert_eq!(left, [("b", NotInuse)]);
        assert!(dev(&mut t, "c", 1, 6, "d", Busy), "above the floor");
        assert!(!dev(&mut t, "c", 1, 4, "d", Busy), "below the floor");
        let o = Origins::new(1000);
        assert_eq!(t.aggregate("d", &o, Unavailable, None), Some(Busy));
        assert_eq!(t.aggregate("d", &o, Unavailable, Some("c")), Some(NotInuse));
        t.end_full_sync("b", Epoch(1), 9);
        t.end_full_sync("c", Epoch(2), 1);
        assert!(t.device("d").is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn keys_longer_than_the_inline_limit_behave_the_same() {
        let long = format!("PJSIP/{}", "x".repeat(40));
        let short = "PJSIP/short";
        let mut t = Table::new();
        let v0 = t.version();
        assert!(t.changes_since(v0).is_some(), "journal switched on");
        assert!(dev(&mut t, "a", 1, 1, &long, Inuse));
        assert!(dev(&mut t, "a", 1, 2, short, Busy));
        assert!(!dev(&mut t, "a", 1, 1, &long, Busy), "older");
        assert_eq!(t.device_keys().collect::<Vec<_>>(), [short, &long]);
        let after: Vec<&str> = t.device_range(Some(short)).map(|(k, _)| k).collect();
        assert_eq!(after, [long.as_str()]);
        assert_eq!(t.device(&long).unwrap().get("a").unwrap().value, Inuse);
        t.mark_device(&long);
        assert_eq!(t.end_full_sync("a", Epoch(1), 3), [short, &long]);
        assert!(t.is_marked(&long) && !t.is_marked(short));
        assert_eq!(t.marked_gone().collect::<Vec<_>>(), [long.as_str()]);
        let changed: Vec<&str> = t.changes_since(v0).expect("journal reaches back").collect();
        assert_eq!(changed, [&long, short, short, &long]);
    }

    #[test]
    fn device_range_resumes_after_a_key_while_the_table_changes() {
        let mut t = Table::new();
        for (i, k) in ["k1", "k3", "k5"].iter().enumerate() {
            dev(&mut t, "a", 1, i as u64 + 1, k, Inuse);
        }
        let first: Vec<&str> = t.device_range(None).map(|(k, _)| k).take(2).collect();
        assert_eq!(first, ["k1", "k3"]);
        // Keys inserted before and after the cursor while it is parked.
        dev(&mut t, "a", 1, 10, "k0", Busy);
        dev(&mut t, "a", 1, 11, "k4", Busy);
        let rest: Vec<&str> = t.device_range(Some("k3")).map(|(k, _)| k).collect();
        assert_eq!(rest, ["k4", "k5"]);
        assert_eq!(
            t.device_range(Some("k2")).next().map(|(k, _)| k),
            Some("k3")
        );
        assert_eq!(t.device_range(Some("zz")).count(), 0);
        let p = Value::Presence(Presence::new(PresenceStatus::Dnd, "", ""));
        t.apply("a", Epoch(1), 20, "P:x", &p, ts(1), Millis(0));
        t.apply("a", Epoch(1), 21, "P:y", &p, ts(1), Millis(0));
        let pk: Vec<&str> = t.presence_range(Some("P:x")).map(|(k, _)| k).collect();
        assert_eq!(pk, ["P:y"]);
    }

    #[test]
    fn compaction_keeps_entries_marks_and_order() {
        let mut t = Table::new();
        t.compact();
        assert_eq!(t.device_keys().count(), 0, "an empty table stays empty");
        for i in 0..500u64 {
            dev(&mut t, "a", 1, i + 1, &format!("k{i:03}"), Inuse);
        }
        dev(&mut t, "b", 1, 1, "k007", Busy);
        t.mark_device("k007");
        let rows = |t: &Table| -> Vec<(String, Vec<DeviceEntry>)> {
            t.device_range(None)
                .map(|(k, e)| (k.to_owned(), e.iter().map(|(_, e)| e.clone()).collect()))
                .collect()
        };
        let before = rows(&t);
        t.compact();
        assert_eq!(rows(&t), before);
        assert!(t.is_marked("k007") && !t.is_marked("k008"));
        assert_eq!(t.device("k007").map(|e| e.len()), Some(2));
        // Still a working map: new keys in the middle and at both ends, and removal.
        assert!(dev(&mut t, "a", 1, 1000, "k0070", Ringing));
        assert!(dev(&mut t, "a", 1, 1001, "a", Ringing));
        assert!(dev(&mut t, "a", 1, 1002, "z", Ringing));
        assert_eq!(t.device_keys().count(), 503);
        assert_eq!(t.end_full_sync("b", Epoch(1), 2), ["k007"]);
        assert_eq!(t.device("k007").map(|e| e.len()), Some(1));
    }
}
