//! The apply path towards one sink (one local Asterisk): a conflating queue with a bounded
//! in-flight window, what the sink is believed to hold, and the echoes of our writes.
//!
//! - **Conflation**: per target only the newest wanted value is kept; a key keeps its place
//!   in the queue when its value is replaced.
//! - **Fair order**: targets are dispatched first-queued first; a target whose previous write
//!   is still in flight waits (writes of one target are never reordered) without blocking the
//!   others.
//! - **Window**: at most `in_flight` writes are outstanding; [`ApplyQueue::complete`] frees a
//!   slot. A write is completed by the [`WriteId`] it was handed out with (the target's id,
//!   no lookup of its name); a handle from before the queue was cleared is ignored.
//! - **Skip**: a write is dropped when the sink already holds the value (tracked from
//!   confirmed writes and trustworthy observations) or when the same value is already in
//!   flight.
//! - **Observations**: what the sink reports on its own ([`ApplyQueue::note_held`] for live
//!   events, [`ApplyQueue::note_listed`] for listings) is believed only when no write of ours
//!   can be newer: never while a write to the target is in flight or waits, and for a listing
//!   never when a write to the target completed after the listing was asked
//!   ([`ApplyQueue::listing_requested`] marks the write generation). A believed device state
//!   that differs from the wanted one queues the wanted value again (a repair; presence seen
//!   changing is a user's change, left to the federation), at most
//!   [`MAX_REPAIRS`] times per wanted value, so a sink that reports a value other than the
//!   one written cannot make the queue write forever.
//! - **Echoes**: the sink reports each write of ours back as an event (possibly twice, and
//!   possibly after the write's answer and after the next write to the target was sent).
//!   Each target remembers the values of its last [`ECHO_VALUES`] writes;
//!   [`ApplyQueue::is_echo`] recognises an event carrying one of them (by target and value,
//!   no time window) until it is superseded, a different value is reported (a real change:
//!   every expectation of the target is dropped), or `echo_max_age_ms` passed since the
//!   target's last write. The apply slot holds them at no extra key.
//! - **Bound**: at most `max_keys` distinct targets wait. When full, the new target is refused
//!   and the queue is flagged overflowed; the owner (a [`crate::node::Node`]) re-derives every
//!   target from its table once the queue drained, so nothing is lost: the table, not the
//!   queue, is the source of truth.
//!
//! Memory: one slot per target ever written or observed, never dropped but all at once.
//! Each target's name is kept once, in a dense list of `(name, slot)` (in blocks of 1,024
//! entries) whose index is the target's id; a hash table of ids finds a name's slot, and the
//! queue order holds ids (4 bytes), not names. The name is a [`CompactString`] (up to 24
//! bytes inline, e.g. `Custom:PJSIP/b3n1234`, without a block of its own). Device targets
//! (the many) keep their slot packed in 8 bytes (values as 4-bit states, the echo age as
//! milliseconds after a time base of the store): 32 bytes per target in the list plus about
//! 6.5 in the hash table, where a map of names to 24-byte slots took 64
//! (`tests/key_memory.rs`). Presence targets keep boxed values in a store of their own.
//! A device target's id also spares the hash table: [`ApplyQueue::push_device`] takes the id
//! a push returned before (a node keeps it with the key in its table) and looks the name up
//! only when that is not the target's id any more.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use compact_str::CompactString;
use hashbrown::HashTable;

use crate::state::{DeviceState, Value};
use crate::time::Millis;

/// Repairs (writes queued again because the sink was seen holding another value) per wanted
/// value at most.
pub const MAX_REPAIRS: u8 = 3;

/// Values of a target's last writes whose echoes are expected (older ones are superseded).
pub const ECHO_VALUES: usize = 2;

/// Capacity of the queue order kept once it is empty: a burst (every key of a snapshot at
/// once) grows it to the number of keys, and an empty ring of that size is let go.
const ORDER_KEEP: usize = 4096;

/// Bounds of an apply queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyConfig {
    /// Distinct targets waiting at most. Default 100 000.
    pub max_keys: usize,
    /// Writes outstanding at most (pipelined `Setvar`). Default 8.
    pub in_flight: usize,
    /// Age after which the echoes of a target's writes are no longer expected, in ms,
    /// counted from the target's last write (at most 2^31 ms, about 24 days, whatever this
    /// says). Default 60 000.
    pub echo_max_age_ms: u64,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_keys: 100_000,
            in_flight: 8,
            echo_max_age_ms: 60_000,
        }
    }
}

/// A write handed out by [`ApplyQueue::next_write_at`], to complete it with
/// [`ApplyQueue::complete`]: the target's id in its store, and the queue's generation then
/// (bumped by [`ApplyQueue::clear`], so a handle from before a clear never names a target of
/// after it; generations repeat after 2^32 clears).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteId {
    /// The target's id as the order holds it ([`OTHER`] set: the presence store).
    tagged: u32,
    generation: u32,
}

/// A write to make: [`ApplyQueue::next_write_at`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write<'a> {
    /// Completes the write ([`ApplyQueue::complete`]).
    pub id: WriteId,
    /// The target's name.
    pub target: &'a str,
    /// The value to write.
    pub value: Value,
}

/// What [`ApplyQueue::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued as a new target.
    Queued,
    /// Replaced the pending value of the target.
    Conflated,
    /// Nothing to do: the sink holds (or is being written) that value.
    Skipped,
    /// Refused: the queue is full (flagged overflowed).
    Overflow,
}

/// Counters of an apply queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Writes dispatched.
    pub dispatched: u64,
    /// Pending values replaced by newer ones.
    pub conflated: u64,
    /// Writes skipped because the sink held the value.
    pub skipped: u64,
    /// Targets refused because the queue was full.
    pub overflowed: u64,
    /// Writes confirmed.
    pub confirmed: u64,
    /// Writes failed.
    pub failed: u64,
    /// Writes queued again because the sink was seen holding another value than wanted.
    pub repaired: u64,
    /// Observations not believed (a write of ours to the target was in flight, waiting, or
    /// completed after a listing was asked).
    pub stale_observations: u64,
    /// Events recognised as echoes of our writes.
    pub echoes: u64,
}

/// How a slot stores the values of one kind: device states as themselves (one byte), other
/// values boxed.
trait Stored: Clone + std::fmt::Debug {
    /// `v` in this form; `None` when `v` is of the other kind.
    fn of(v: &Value) -> Option<Self>;
    /// Whether this is `v`.
    fn is(&self, v: &Value) -> bool;
    /// The value.
    fn get(&self) -> &Value;
}

static INVALID: Value = Value::Device(DeviceState::Invalid);
static UNKNOWN: Value = Value::Device(DeviceState::Unknown);
static UNAVAILABLE: Value = Value::Device(DeviceState::Unavailable);
static NOT_INUSE: Value = Value::Device(DeviceState::NotInuse);
static ONHOLD: Value = Value::Device(DeviceState::Onhold);
static RINGING: Value = Value::Device(DeviceState::Ringing);
static INUSE: Value = Value::Device(DeviceState::Inuse);
static BUSY: Value = Value::Device(DeviceState::Busy);
static RINGINUSE: Value = Value::Device(DeviceState::Ringinuse);

impl Stored for DeviceState {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Device(s) => Some(*s),
            Value::Presence(_) => None,
        }
    }

    fn is(&self, v: &Value) -> bool {
        matches!(v, Value::Device(s) if s == self)
    }

    fn get(&self) -> &Value {
        state_value(*self)
    }
}

impl Stored for Box<Value> {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Device(_) => None,
            Value::Presence(_) => Some(Box::new(v.clone())),
        }
    }

    fn is(&self, v: &Value) -> bool {
        **self == *v
    }

    fn get(&self) -> &Value {
        self
    }
}

/// Everything known about one target (as the queue's logic sees it; device slots are kept
/// packed, see [`Packed`]).
#[derive(Clone, Debug)]
struct Slot<T> {
    /// What the owner last asked the target to hold.
    want: Option<T>,
    /// What the sink is believed to hold.
    held: Option<T>,
    /// The value of the write in flight.
    flight: Option<T>,
    /// Values of our last writes whose echo is expected, newest first.
    echo: [Option<T>; ECHO_VALUES],
    /// `want` waits to be written (the target is in the order).
    pending: bool,
    /// Repairs since `want` last changed.
    repairs: u8,
    /// When the last write was dispatched (the echo age bound).
    sent_at: Millis,
    /// A write to the target completed since the last [`ApplyQueue::listing_requested`].
    done: bool,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            want: None,
            held: None,
            flight: None,
            echo: std::array::from_fn(|_| None),
            pending: false,
            repairs: 0,
            sent_at: Millis(0),
            done: false,
        }
    }
}

impl<T: Stored> Slot<T> {
    fn holds(&self, v: &Value) -> bool {
        self.held.as_ref().is_some_and(|h| h.is(v))
    }

    /// A write of `v` was dispatched at `now`: its echo is expected (first), the others
    /// keep their order, the oldest falls out.
    fn expect_echo(&mut self, v: &T, now: Millis) {
        let value = v.get();
        if let Some(i) = self
            .echo
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.is(value)))
        {
            self.echo[..=i].rotate_right(1);
        } else {
            self.echo.rotate_right(1);
            self.echo[0] = Some(v.clone());
        }
        self.sent_at = now;
    }

    /// See [`ApplyQueue::is_echo`].
    fn is_echo(&mut self, v: &Value, now: Millis, max_age: u64) -> bool {
        if now.since(self.sent_at) > max_age {
            self.echo = std::array::from_fn(|_| None);
            return false;
        }
        match self
            .echo
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.is(v)))
        {
            Some(i) => {
                // Asterisk reports writes in order: older expectations are superseded; the
                // matched one stays, so a repeated event is recognised too.
                for e in &mut self.echo[i + 1..] {
                    *e = None;
                }
                true
            }
            None => {
                self.echo = std::array::from_fn(|_| None);
                false
            }
        }
    }
}

/// The device states in declaration order (`state as usize` indexes it).
const STATES: [DeviceState; 9] = DeviceState::ALL;
const _: () = {
    let mut i = 0;
    while i < STATES.len() {
        assert!(
            STATES[i] as usize == i,
            "DeviceState::ALL is in declaration order"
        );
        i += 1;
    }
};

// The packed layout below holds exactly two echo values and repairs in two bits.
const _: () = assert!(ECHO_VALUES == 2 && MAX_REPAIRS <= 3);

/// A device slot in one `u64`: `want`, `held`, `flight` and the two echo values as 4-bit
/// states (0: none) in bits 0–19, `pending` bit 20, `repairs` bits 21–22, `done` bit 23,
/// and `sent_at` in bits 32–63 as milliseconds after its store's time base (see
/// [`Store::rebase`]).
#[derive(Clone, Copy, Debug, Default)]
struct Packed(u64);

/// Bits of the echo values in a [`Packed`] slot.
const ECHO_BITS: u64 = 0xff << 12;

impl Packed {
    fn state(bits: u64) -> Option<DeviceState> {
        match (bits & 0xf) as usize {
            0 => None,
            n => STATES.get(n - 1).copied(),
        }
    }

    fn nibble(s: Option<DeviceState>) -> u64 {
        s.map_or(0, |s| s as u64 + 1)
    }

    fn unpack(self, base: Millis) -> Slot<DeviceState> {
        let b = self.0;
        Slot {
            want: Packed::state(b),
            held: Packed::state(b >> 4),
            flight: Packed::state(b >> 8),
            echo: [Packed::state(b >> 12), Packed::state(b >> 16)],
            pending: b >> 20 & 1 == 1,
            repairs: (b >> 21 & 3) as u8,
            done: b >> 23 & 1 == 1,
            sent_at: Millis(base.0 + (b >> 32)),
        }
    }

    /// `s` packed; `s.sent_at` must lie within 2^32 ms after `base` (an earlier time is
    /// taken as `base`).
    fn pack(s: &Slot<DeviceState>, base: Millis) -> Packed {
        let rel = s.sent_at.0.saturating_sub(base.0);
        debug_assert!(rel <= u64::from(u32::MAX), "rebased before packing");
        Packed(
            Packed::nibble(s.want)
                | Packed::nibble(s.held) << 4
                | Packed::nibble(s.flight) << 8
                | Packed::nibble(s.echo[0]) << 12
                | Packed::nibble(s.echo[1]) << 16
                | u64::from(s.pending) << 20
                | u64::from(s.repairs.min(3)) << 21
                | u64::from(s.done) << 23
                | rel.min(u64::from(u32::MAX)) << 32,
        )
    }
}

/// The slots of one kind of target: each target's name once, in a dense list (its index is
/// the target's id, which the queue order holds), and a hash table of ids to find them by
/// name. Slots are never removed but all at once ([`Store::clear`]).
#[derive(Clone, Debug, Default)]
struct Store<C> {
    index: HashTable<u32>,
    entries: Segments<(CompactString, C)>,
    /// foldhash, seeded per process (was SipHash: a tenth of the agent's receive path).
    /// Targets are names of devices of authenticated peers and of the local Asterisk, not
    /// of anyone on the network, and the seed is unknown to them, so flooding one bucket
    /// takes a peer holding the shared key, who can do worse anyway.
    hasher: RandomState,
    /// Time base of packed `sent_at` values (device slots).
    base: Millis,
}

/// Entries of a [`Segments`] block (a block of device slots: 32 KiB).
const SEGMENT: usize = 1 << 10;

/// A list kept in blocks of [`SEGMENT`] entries (the first grows by doubling up to that):
/// growing never copies it nor asks for one large allocation, and a block fits in the
/// holes that freed buffers (e.g. a snapshot's messages) leave in the heap.
#[derive(Clone, Debug)]
struct Segments<E> {
    blocks: Vec<Vec<E>>,
    len: usize,
}

impl<E> Default for Segments<E> {
    fn default() -> Self {
        Segments {
            blocks: Vec::new(),
            len: 0,
        }
    }
}

impl<E> Segments<E> {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, e: E) {
        match self.blocks.last_mut() {
            Some(b) if b.len() < SEGMENT => b.push(e),
            last => {
                let mut b = if last.is_none() {
                    Vec::new()
                } else {
                    Vec::with_capacity(SEGMENT)
                };
                b.push(e);
                self.blocks.push(b);
            }
        }
        self.len += 1;
    }

    fn get(&self, i: usize) -> &E {
        &self.blocks[i / SEGMENT][i % SEGMENT]
    }

    fn get_mut(&mut self, i: usize) -> &mut E {
        &mut self.blocks[i / SEGMENT][i % SEGMENT]
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut E> {
        self.blocks.iter_mut().flatten()
    }

    fn clear(&mut self) {
        self.blocks.clear();
        self.len = 0;
    }
}

/// A slot kept in a [`Store`]: device slots packed, the others as they are.
trait Cell: Clone + Default + std::fmt::Debug + Sized {
    /// The form of the values.
    type T: Stored;
    /// Runs `f` on the slot of `id`.
    fn with<R>(store: &mut Store<Self>, id: u32, f: impl FnOnce(&mut Slot<Self::T>) -> R) -> R;
    /// What the sink is believed to hold.
    fn held(&self) -> Option<&Value>;
}

impl Cell for Packed {
    type T = DeviceState;

    fn with<R>(store: &mut Store<Self>, id: u32, f: impl FnOnce(&mut Slot<DeviceState>) -> R) -> R {
        let i = id as usize;
        let mut s = store.entries.get(i).1.unpack(store.base);
        let r = f(&mut s);
        if s.sent_at.0.saturating_sub(store.base.0) > u64::from(u32::MAX) {
            store.rebase(s.sent_at);
        }
        store.entries.get_mut(i).1 = Packed::pack(&s, store.base);
        r
    }

    fn held(&self) -> Option<&Value> {
        Packed::state(self.0 >> 4).map(state_value)
    }
}

impl Cell for Slot<Box<Value>> {
    type T = Box<Value>;

    fn with<R>(store: &mut Store<Self>, id: u32, f: impl FnOnce(&mut Slot<Box<Value>>) -> R) -> R {
        f(&mut store.entries.get_mut(id as usize).1)
    }

    fn held(&self) -> Option<&Value> {
        self.held.as_ref().map(Stored::get)
    }
}

/// The `Value` of a device state, for as long as the program runs.
fn state_value(s: DeviceState) -> &'static Value {
    match s {
        DeviceState::Invalid => &INVALID,
        DeviceState::Unknown => &UNKNOWN,
        DeviceState::Unavailable => &UNAVAILABLE,
        DeviceState::NotInuse => &NOT_INUSE,
        DeviceState::Onhold => &ONHOLD,
        DeviceState::Ringing => &RINGING,
        DeviceState::Inuse => &INUSE,
        DeviceState::Busy => &BUSY,
        DeviceState::Ringinuse => &RINGINUSE,
    }
}

/// Ids of a store at most (the top bit of an id in the order names the store).
const MAX_IDS: usize = 1 << 31;

impl<C: Cell> Store<C> {
    fn id(&self, target: &str) -> Option<u32> {
        let h = self.hasher.hash_one(target);
        self.index
            .find(h, |&i| self.entries.get(i as usize).0 == target)
            .copied()
    }

    fn id_or_insert(&mut self, target: &str) -> u32 {
        if let Some(id) = self.id(target) {
            return id;
        }
        assert!(self.entries.len() < MAX_IDS, "fewer than 2^31 targets");
        let id = self.entries.len() as u32;
        self.entries
            .push((CompactString::from(target), C::default()));
        let Store {
            index,
            entries,
            hasher,
            ..
        } = self;
        index.insert_unique(hasher.hash_one(target), id, |&i| {
            hasher.hash_one(entries.get(i as usize).0.as_str())
        });
        id
    }

    /// [`Store::id_or_insert`], taking `hint` when it is the target's id (checked against the
    /// name: the entry is the one the caller touches next anyway, so a right hint spares the
    /// hash table's lookup at no cache miss of its own).
    fn id_or_insert_hinted(&mut self, target: &str, hint: u32) -> u32 {
        let i = hint as usize;
        if i < self.entries.len() && self.entries.get(i).0 == target {
            return hint;
        }
        self.id_or_insert(target)
    }

    fn key(&self, id: u32) -> &str {
        &self.entries.get(id as usize).0
    }

    fn get(&self, target: &str) -> Option<&C> {
        self.id(target).map(|id| &self.entries.get(id as usize).1)
    }

    /// Runs `f` on every slot.
    fn each(&mut self, mut f: impl FnMut(&mut Slot<C::T>)) {
        for id in 0..self.entries.len() as u32 {
            C::with(self, id, &mut f);
        }
    }

    fn reserve(&mut self, additional: usize) {
        let Store {
            index,
            entries,
            hasher,
            ..
        } = self;
        index.reserve(additional, |&i| {
            hasher.hash_one(entries.get(i as usize).0.as_str())
        });
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.index.clear();
        self.entries.clear();
    }
}

impl Store<Packed> {
    /// Moves the time base to 2^31 ms before `at` (a write time 2^32 ms or more after the
    /// base): `sent_at` values shift along; expectations sent before the new base (2^31 ms,
    /// about 24 days, before `at`) are dropped, long expired (see
    /// [`ApplyConfig::echo_max_age_ms`]).
    fn rebase(&mut self, at: Millis) {
        let base = Millis(at.0 - (1 << 31));
        let shift = base.0 - self.base.0;
        for (_, p) in self.entries.iter_mut() {
            let rel = p.0 >> 32;
            p.0 = if rel >= shift {
                (p.0 & 0xffff_ffff) | (rel - shift) << 32
            } else {
                p.0 & 0xffff_ffff & !ECHO_BITS
            };
        }
        self.base = base;
    }
}

/// The queue state beside the slots.
#[derive(Clone, Debug, Default)]
struct Shared {
    config: ApplyConfig,
    /// Ids of the waiting targets, first-queued first ([`OTHER`] set: a presence target).
    order: VecDeque<u32>,
    pending: usize,
    in_flight: usize,
    /// A listing was asked ([`ApplyQueue::listing_requested`]) and is not done yet.
    listing_marked: bool,
    overflowed: bool,
    stats: ApplyStats,
    /// The latest time given to the queue (for [`ApplyQueue::next_write`]).
    clock: Millis,
    /// Bumped by [`ApplyQueue::clear`] (see [`WriteId`]).
    generation: u32,
}

/// The bit of an order id naming a target of the presence store.
const OTHER: u32 = 1 << 31;

/// A hint naming no target ([`ApplyQueue::push_device`]): ids stay below [`MAX_IDS`].
const NO_HINT: u32 = u32::MAX;

/// Pushes `value` for `target` (whose id in `store` may be `hint`, see
/// [`ApplyQueue::push_device`]); returns what it did and the target's id ([`NO_HINT`] for a
/// value of the store's other kind).
fn push_in<C: Cell>(
    store: &mut Store<C>,
    q: &mut Shared,
    tag: u32,
    target: &str,
    value: &Value,
    hint: u32,
) -> (Push, u32) {
    let Some(stored) = C::T::of(value) else {
        return (Push::Skipped, NO_HINT);
    };
    let full = q.pending >= q.config.max_keys.max(1);
    let id = store.id_or_insert_hinted(target, hint);
    let push = C::with(store, id, |slot| {
        if !slot.want.as_ref().is_some_and(|w| w.is(value)) {
            slot.want = Some(stored);
            slot.repairs = 0;
        }
        let already = match &slot.flight {
            Some(f) => f.is(value),
            None => slot.holds(value),
        };
        if already {
            if slot.pending {
                slot.pending = false;
                q.pending -= 1;
            }
            q.stats.skipped += 1;
            return Push::Skipped;
        }
        if slot.pending {
            q.stats.conflated += 1;
            return Push::Conflated;
        }
        if full {
            q.overflowed = true;
            q.stats.overflowed += 1;
            return Push::Overflow;
        }
        slot.pending = true;
        q.pending += 1;
        q.order.push_back(id | tag);
        Push::Queued
    });
    (push, id)
}

/// What dispatching the target at the front of the order came to.
enum Dispatch {
    /// Not waiting (skipped, or queued twice and already dispatched): dropped from the order.
    Drop,
    /// Its previous write is still in flight: out of the order until that write completes
    /// ([`complete_in`] puts it back), so a long order of such targets is not walked again
    /// for every write asked.
    Parked,
    /// Write this.
    Write(Value),
}

fn dispatch<T: Stored>(slot: &mut Slot<T>, q: &mut Shared, now: Millis) -> Dispatch {
    if !slot.pending {
        return Dispatch::Drop;
    }
    if slot.flight.is_some() {
        return Dispatch::Parked;
    }
    slot.pending = false;
    q.pending -= 1;
    let Some(want) = slot.want.clone() else {
        return Dispatch::Drop;
    };
    if slot.holds(want.get()) {
        q.stats.skipped += 1;
        return Dispatch::Drop;
    }
    let value = want.get().clone();
    slot.expect_echo(&want, now);
    slot.flight = Some(want);
    q.in_flight += 1;
    q.stats.dispatched += 1;
    Dispatch::Write(value)
}

/// Completes the write in flight to the slot of `tagged` (its id in the order); a newer value
/// waiting for it goes back to the order (a copy still in the order is dropped when reached).
fn complete_in<T: Stored>(slot: &mut Slot<T>, q: &mut Shared, ok: bool, tagged: u32) -> bool {
    let Some(v) = slot.flight.take() else {
        return false;
    };
    q.in_flight -= 1;
    if slot.pending {
        q.order.push_back(tagged);
    }
    slot.done = true;
    if ok {
        q.stats.confirmed += 1;
        slot.held = Some(v);
    } else {
        q.stats.failed += 1;
        slot.held = None;
    }
    true
}

/// How an observation is judged.
#[derive(Clone, Copy)]
enum Seen {
    /// A live event: not believed over a write in flight or waiting.
    Live,
    /// A listing item: not believed over a write in flight or (`marked`: the listing was
    /// asked) completed since the listing was asked.
    Listed { marked: bool },
}

fn observe_in<C: Cell>(
    store: &mut Store<C>,
    q: &mut Shared,
    tag: u32,
    target: &str,
    value: &Value,
    seen: Seen,
) {
    let Some(stored) = C::T::of(value) else {
        return;
    };
    let id = store.id_or_insert(target);
    C::with(store, id, |slot| {
        let stale = match seen {
            Seen::Live => slot.flight.is_some() || slot.pending,
            Seen::Listed { marked } => slot.flight.is_some() || (marked && slot.done),
        };
        if stale {
            q.stats.stale_observations += 1;
            return;
        }
        if !slot.holds(value) {
            slot.held = Some(stored);
        }
        // Only devices are repaired: a `Custom:` device is ours to write, whereas a presence
        // set locally is a user's change that the federation decides about.
        let differs =
            matches!(value, Value::Device(_)) && slot.want.as_ref().is_some_and(|w| !w.is(value));
        if differs && !slot.pending && slot.repairs < MAX_REPAIRS {
            slot.repairs += 1;
            slot.pending = true;
            q.stats.repaired += 1;
            q.pending += 1;
            q.order.push_back(id | tag);
        }
    });
}

/// See [`ApplyQueue::listing_begins`].
fn forget_listed<T>(slot: &mut Slot<T>, marked: bool) {
    if slot.flight.is_none() && !(marked && slot.done) {
        slot.held = None;
    }
}

/// A conflating apply queue for one sink.
#[derive(Clone, Debug, Default)]
pub struct ApplyQueue {
    devices: Store<Packed>,
    others: Store<Slot<Box<Value>>>,
    q: Shared,
}

impl ApplyQueue {
    /// An empty queue.
    pub fn new(config: ApplyConfig) -> Self {
        ApplyQueue {
            devices: Store::default(),
            others: Store::default(),
            q: Shared {
                config,
                ..Shared::default()
            },
        }
    }

    fn tick_clock(&mut self, now: Millis) {
        self.q.clock = self.q.clock.max(now);
    }

    /// Asks for `target` to hold `value`.
    pub fn push(&mut self, target: String, value: Value) -> Push {
        self.push_ref(&target, &value)
    }

    /// [`ApplyQueue::push`] without giving up the key and value.
    pub fn push_ref(&mut self, target: &str, value: &Value) -> Push {
        let q = &mut self.q;
        match value {
            Value::Device(_) => push_in(&mut self.devices, q, 0, target, value, NO_HINT).0,
            Value::Presence(_) => push_in(&mut self.others, q, OTHER, target, value, NO_HINT).0,
        }
    }

    /// [`ApplyQueue::push_ref`] of a device state, given `hint`: the id this method returned
    /// for `target` before, to spare the lookup of the name (any number will do: it is used
    /// only when it is still `target`'s id, which is checked against the name, so an id
    /// from before a [`ApplyQueue::clear`] or of another target makes a lookup). Returns what
    /// the push did and `target`'s id, the hint for its next push.
    pub fn push_device(&mut self, target: &str, state: DeviceState, hint: u32) -> (Push, u32) {
        let value = Value::Device(state);
        push_in(&mut self.devices, &mut self.q, 0, target, &value, hint)
    }

    /// Makes room for `targets` device targets in all (a pass over a table of that many
    /// keys is coming): one allocation of the index's final size instead of a series of
    /// doublings, each leaving the previous, smaller one to the allocator.
    pub fn reserve_devices(&mut self, targets: usize) {
        self.devices
            .reserve(targets.saturating_sub(self.devices.len()));
    }

    /// The next write to send, if the window has room and something is pending; its echo
    /// is expected from `now` on (see [`ApplyQueue::is_echo`]). Report its outcome with
    /// [`ApplyQueue::complete`] and its [`Write::id`].
    pub fn next_write_at(&mut self, now: Millis) -> Option<Write<'_>> {
        self.tick_clock(now);
        if self.q.in_flight >= self.q.config.in_flight.max(1) {
            return None;
        }
        if self.q.order.is_empty() {
            if self.q.order.capacity() > ORDER_KEEP {
                self.q.order = VecDeque::new();
            }
            return None;
        }
        let budget = self.q.order.len();
        for _ in 0..budget {
            let tagged = self.q.order.pop_front()?;
            let id = tagged & !OTHER;
            let q = &mut self.q;
            let d = if tagged & OTHER == 0 {
                Packed::with(&mut self.devices, id, |s| dispatch(s, q, now))
            } else {
                Cell::with(&mut self.others, id, |s| dispatch(s, q, now))
            };
            match d {
                Dispatch::Drop | Dispatch::Parked => {}
                Dispatch::Write(value) => {
                    let target = if tagged & OTHER == 0 {
                        self.devices.key(id)
                    } else {
                        self.others.key(id)
                    };
                    let id = WriteId {
                        tagged,
                        generation: self.q.generation,
                    };
                    return Some(Write { id, target, value });
                }
            }
        }
        None
    }

    /// [`ApplyQueue::next_write_at`] at the latest time the queue was given.
    pub fn next_write(&mut self) -> Option<Write<'_>> {
        self.next_write_at(self.q.clock)
    }

    /// The write handed out as `id` finished. On success the sink now holds the value; on
    /// failure what it holds is unknown. Returns whether a write to its target was in flight
    /// (false, and nothing done, for a handle from before a [`ApplyQueue::clear`]). A target
    /// has one write in flight at most, so the handle of any write to it completes that one.
    pub fn complete(&mut self, id: WriteId, ok: bool) -> bool {
        if id.generation != self.q.generation {
            return false;
        }
        let (tagged, q) = (id.tagged, &mut self.q);
        let i = tagged & !OTHER;
        if tagged & OTHER == 0 {
            (i as usize) < self.devices.len()
                && Packed::with(&mut self.devices, i, |s| complete_in(s, q, ok, tagged))
        } else {
            (i as usize) < self.others.len()
                && Cell::with(&mut self.others, i, |s| complete_in(s, q, ok, tagged))
        }
    }

    /// Whether an event saying `target` now holds `value` is the echo of one of our writes
    /// (see the module docs). On a match, expectations of writes older than the matched one
    /// are dropped (Asterisk reports writes in order); the matched one stays, so a repeated
    /// event is recognised too. An event with any other value is a real change: every
    /// expectation of the target is dropped. Never creates a slot.
    pub fn is_echo(&mut self, target: &str, value: &Value, now: Millis) -> bool {
        self.tick_clock(now);
        let max_age = self.q.config.echo_max_age_ms;
        let echo = match value {
            Value::Device(_) => self.devices.id(target).is_some_and(|id| {
                Packed::with(&mut self.devices, id, |s| s.is_echo(value, now, max_age))
            }),
            Value::Presence(_) => self.others.id(target).is_some_and(|id| {
                Cell::with(&mut self.others, id, |s| s.is_echo(value, now, max_age))
            }),
        };
        if echo {
            self.q.stats.echoes += 1;
        }
        echo
    }

    /// Drops every echo expectation (the sink restarted: events of writes to the old one
    /// will not come).
    pub fn forget_echoes(&mut self) {
        self.devices.each(|s| s.echo = [None; ECHO_VALUES]);
        self.others.each(|s| s.echo = std::array::from_fn(|_| None));
    }

    /// The sink reported by a live event (not the echo of a write of ours) that `target`
    /// holds `value`. Not believed while a write to `target` is in flight or waits (the
    /// event may be older than that write); otherwise recorded, and when the wanted value is
    /// another one, that is queued again (see the module docs on repairs).
    pub fn note_held(&mut self, target: &str, value: &Value) {
        self.observe(target, value, Seen::Live);
    }

    fn observe(&mut self, target: &str, value: &Value, seen: Seen) {
        let q = &mut self.q;
        match value {
            Value::Device(_) => observe_in(&mut self.devices, q, 0, target, value, seen),
            Value::Presence(_) => observe_in(&mut self.others, q, OTHER, target, value, seen),
        }
    }

    /// Marks the moment a listing of the sink is asked: items of that listing
    /// ([`ApplyQueue::note_listed`]) are not believed for targets whose write completed
    /// later. Call when the listing action is sent. (One pass over the slots.)
    pub fn listing_requested(&mut self) {
        self.q.listing_marked = true;
        self.devices.each(|s| s.done = false);
        self.others.each(|s| s.done = false);
    }

    /// A listing (asked at the last [`ApplyQueue::listing_requested`], or now if none is
    /// marked) arrives: forgets what the sink was believed to hold for every target that the
    /// listing speaks for (no write in flight, none completed after the mark), so that
    /// targets missing from the listing are written again. Follow with
    /// [`ApplyQueue::note_listed`] per item and [`ApplyQueue::listing_done`].
    pub fn listing_begins(&mut self) {
        let marked = self.q.listing_marked;
        self.devices.each(|s| forget_listed(s, marked));
        self.others.each(|s| forget_listed(s, marked));
    }

    /// One item of a listing says `target` holds `value`. Believed unless a write to
    /// `target` is in flight or completed after the listing was asked; a believed value
    /// other than the wanted one queues the wanted one again.
    pub fn note_listed(&mut self, target: &str, value: &Value) {
        let marked = self.q.listing_marked;
        self.observe(target, value, Seen::Listed { marked });
    }

    /// The listing is processed: the mark is dropped.
    pub fn listing_done(&mut self) {
        self.q.listing_marked = false;
    }

    /// Forgets what the sink holds (it restarted or reconnected: write everything again).
    pub fn forget_held(&mut self) {
        self.devices.each(|s| s.held = None);
        self.others.each(|s| s.held = None);
    }

    /// Drops everything: pending, in flight, held and expected echoes (the sink connection
    /// is gone).
    pub fn clear(&mut self) {
        self.devices.clear();
        self.others.clear();
        self.q.order.clear();
        self.q.pending = 0;
        self.q.in_flight = 0;
        self.q.listing_marked = false;
        self.q.generation = self.q.generation.wrapping_add(1);
    }

    /// What the sink is known to hold for `target`.
    pub fn held(&self, target: &str) -> Option<&Value> {
        if let Some(h) = self.devices.get(target).and_then(Cell::held) {
            return Some(h);
        }
        self.others.get(target)?.held()
    }

    /// Number of targets waiting.
    pub fn pending_len(&self) -> usize {
        self.q.pending
    }

    /// Number of writes outstanding.
    pub fn in_flight_len(&self) -> usize {
        self.q.in_flight
    }

    /// Number of targets the queue knows (written, wanted or observed).
    pub fn targets_len(&self) -> usize {
        self.devices.len() + self.others.len()
    }

    /// Returns and clears the overflow flag.
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.q.overflowed)
    }

    /// The counters.
    pub fn stats(&self) -> &ApplyStats {
        &self.q.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeviceState::{self, *};

    fn d(s: DeviceState) -> Value {
        Value::Device(s)
    }

    /// The next write, as its target and value.
    fn nw(a: &mut ApplyQueue) -> Option<(String, Value)> {
        a.next_write().map(|w| (w.target.to_owned(), w.value))
    }

    /// [`nw`] at `now`.
    fn nwa(a: &mut ApplyQueue, now: Millis) -> Option<(String, Value)> {
        a.next_write_at(now).map(|w| (w.target.to_owned(), w.value))
    }

    /// Completes the write in flight to `target` by its handle (found by name, devices first,
    /// as the queue's owner keeps it from [`ApplyQueue::next_write_at`]).
    fn done(a: &mut ApplyQueue, target: &str, ok: bool) -> bool {
        let generation = a.q.generation;
        let mut ids = [a.devices.id(target), a.others.id(target).map(|i| i | OTHER)]
            .into_iter()
            .flatten();
        ids.any(|tagged| a.complete(WriteId { tagged, generation }, ok))
    }

    fn q(max_keys: usize, in_flight: usize) -> ApplyQueue {
        ApplyQueue::new(ApplyConfig {
            max_keys,
            in_flight,
            ..ApplyConfig::default()
        })
    }

    #[test]
    fn conflates_per_key_and_keeps_position() {
        let mut a = q(10, 1);
        assert_eq!(a.push("x".into(), d(Ringing)), Push::Queued);
        assert_eq!(a.push("y".into(), d(Inuse)), Push::Queued);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Conflated);
        assert_eq!(nw(&mut a), Some(("x".into(), d(Inuse))));
        assert_eq!(nw(&mut a), None, "window of one");
        assert!(done(&mut a, "x", true));
        assert_eq!(nw(&mut a), Some(("y".into(), d(Inuse))));
        assert!(!done(&mut a, "zz", true));
    }

    /// A value waiting for its target's write in flight leaves the order (a long order of
    /// them was walked again for every write asked) and comes back when that write completes.
    #[test]
    fn values_waiting_for_a_write_in_flight_leave_the_order_until_it_completes() {
        let mut a = q(100, 8);
        for t in ["a", "b", "c", "d"] {
            a.push(t.into(), d(Inuse));
        }
        for _ in 0..4 {
            assert!(nw(&mut a).is_some());
        }
        for t in ["a", "b", "c", "d"] {
            assert_eq!(a.push(t.into(), d(Busy)), Push::Queued);
        }
        assert_eq!(nw(&mut a), None, "each waits for its write in flight");
        assert!(a.q.order.is_empty(), "parked: {:?}", a.q.order);
        assert_eq!(a.pending_len(), 4);
        assert!(done(&mut a, "c", true));
        assert_eq!(nw(&mut a), Some(("c".into(), d(Busy))));
        assert_eq!(nw(&mut a), None);
        for t in ["a", "b", "d"] {
            assert!(done(&mut a, t, false));
        }
        let mut rest: Vec<String> = std::iter::from_fn(|| nw(&mut a).map(|(t, _)| t)).collect();
        rest.sort();
        assert_eq!(
            rest,
            ["a", "b", "d"],
            "failed writes free their waiting values too"
        );
        assert_eq!(a.pending_len(), 0);
    }

    #[test]
    fn skips_what_the_sink_holds_or_is_being_written() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Inuse));
        let (t, _) = nw(&mut a).unwrap();
        assert_eq!(
            a.push("x".into(), d(Inuse)),
            Push::Skipped,
            "same value in flight"
        );
        done(&mut a, &t, true);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Skipped, "held");
        assert_eq!(a.push("x".into(), d(Busy)), Push::Queued);
        assert_eq!(
            a.push("x".into(), d(Inuse)),
            Push::Skipped,
            "back to held: pending dropped"
        );
        assert_eq!(nw(&mut a), None);
        a.forget_held();
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Queued);
        let (t, _) = nw(&mut a).unwrap();
        done(&mut a, &t, false);
        assert_eq!(a.held("x"), None, "failed write: unknown");
        assert_eq!(a.stats().failed, 1);
    }

    #[test]
    fn writes_of_one_target_are_not_reordered_and_do_not_block_others() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        assert_eq!(nw(&mut a), Some(("x".into(), d(Ringing))));
        a.push("x".into(), d(Inuse));
        a.push("y".into(), d(Busy));
        assert_eq!(
            nw(&mut a),
            Some(("y".into(), d(Busy))),
            "x waits for its write in flight"
        );
        assert_eq!(nw(&mut a), None);
        done(&mut a, "x", true);
        assert_eq!(nw(&mut a), Some(("x".into(), d(Inuse))));
    }

    #[test]
    fn window_bounds_in_flight() {
        let mut a = q(100, 3);
        for i in 0..10 {
            a.push(format!("k{i}"), d(Inuse));
        }
        let mut got = Vec::new();
        while let Some((t, _)) = nw(&mut a) {
            got.push(t);
        }
        assert_eq!(got, vec!["k0", "k1", "k2"], "fair: first queued first");
        assert_eq!(a.in_flight_len(), 3);
        done(&mut a, "k1", true);
        assert_eq!(nw(&mut a).unwrap().0, "k3");
    }

    #[test]
    fn random_pushes_end_with_the_last_value_per_key_and_respect_the_window() {
        use proptest::prelude::*;
        let states = [Inuse, NotInuse, Busy, Ringing];
        proptest!(ProptestConfig::with_cases(200), |(
            ops in proptest::collection::vec((0..5usize, 0..4usize, any::<bool>()), 1..60),
            window in 1..4usize,
        )| {
            let mut a = q(100, window);
            let mut last = std::collections::HashMap::new();
            let mut in_flight: Vec<String> = Vec::new();
            for (k, s, complete) in ops {
                let key = format!("k{k}");
                a.push(key.clone(), d(states[s]));
                last.insert(key, d(states[s]));
                while let Some((t, _)) = nw(&mut a) {
                    prop_assert!(!in_flight.contains(&t), "one write per target at a time");
                    in_flight.push(t);
                }
                prop_assert!(a.in_flight_len() <= window);
                if complete && !in_flight.is_empty() {
                    let t = in_flight.remove(0);
                    done(&mut a, &t, true);
                }
            }
            // Drain everything.
            loop {
                while let Some((t, _)) = nw(&mut a) {
                    in_flight.push(t);
                }
                if in_flight.is_empty() {
                    break;
                }
                let t = in_flight.remove(0);
                done(&mut a, &t, true);
            }
            for (k, v) in last {
                prop_assert_eq!(a.held(&k), Some(&v));
            }
        });
    }

    /// Dispatches and confirms everything pending; returns the writes in order.
    fn drain(a: &mut ApplyQueue) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some((t, v)) = nw(a) {
            done(a, &t, true);
            out.push((t, v));
        }
        out
    }

    #[test]
    fn a_listing_older_than_a_completed_write_is_not_believed() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        drain(&mut a);
        // The listing is asked while x holds RINGING...
        a.listing_requested();
        // ...then x is written INUSE and confirmed before the listing arrives.
        a.push("x".into(), d(Inuse));
        assert_eq!(drain(&mut a), vec![("x".into(), d(Inuse))]);
        a.listing_begins();
        a.note_listed("x", &d(Ringing));
        a.listing_done();
        assert_eq!(a.held("x"), Some(&d(Inuse)), "the confirmation is newer");
        assert_eq!(a.stats().stale_observations, 1);
        assert_eq!(a.push("x".into(), d(Inuse)), Push::Skipped);
        assert_eq!(nw(&mut a), None);
        // The same listing item for a target written before the mark is believed, and since
        // it is not what is wanted, the wanted value is written again.
        a.push("y".into(), d(Busy));
        drain(&mut a);
        a.listing_requested();
        a.listing_begins();
        a.note_listed("y", &d(NotInuse));
        a.listing_done();
        assert_eq!(a.held("y"), Some(&d(NotInuse)));
        assert_eq!(drain(&mut a), vec![("y".into(), d(Busy))]);
    }

    #[test]
    fn a_listing_ignores_writes_in_flight_and_forgets_targets_it_does_not_name() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        a.push("y".into(), d(Busy));
        drain(&mut a);
        a.push("x".into(), d(Inuse));
        let w = nw(&mut a).unwrap();
        a.listing_requested();
        a.listing_begins();
        a.note_listed("x", &d(Ringing));
        a.listing_done();
        assert_eq!(a.held("y"), None, "not listed: unknown, written again");
        done(&mut a, &w.0, true);
        assert_eq!(a.held("x"), Some(&d(Inuse)));
        assert_eq!(a.push("y".into(), d(Busy)), Push::Queued);
        // Without a mark a listing is taken as current (but never over a write in flight).
        a.listing_begins();
        a.note_listed("x", &d(Inuse));
        a.listing_done();
        assert_eq!(a.held("x"), Some(&d(Inuse)));
    }

    #[test]
    fn a_live_event_is_not_believed_over_a_waiting_or_flying_write() {
        let mut a = q(10, 1);
        a.push("x".into(), d(Inuse));
        drain(&mut a);
        a.push("x".into(), d(Busy));
        a.push("y".into(), d(Busy));
        assert_eq!(nw(&mut a), Some(("x".into(), d(Busy))));
        // A late event of the earlier INUSE while BUSY flies, and one saying BUSY for y
        // while y still waits: neither may decide.
        a.note_held("x", &d(Inuse));
        a.note_held("y", &d(Busy));
        assert_eq!(a.stats().stale_observations, 2);
        done(&mut a, "x", true);
        assert_eq!(a.held("x"), Some(&d(Busy)));
        assert_eq!(
            nw(&mut a),
            Some(("y".into(), d(Busy))),
            "y is written although an event said it held BUSY"
        );
    }

    #[test]
    fn a_sink_seen_drifting_from_the_wanted_value_is_repaired_a_bounded_number_of_times() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Inuse));
        drain(&mut a);
        a.note_held("x", &d(Inuse));
        assert_eq!(nw(&mut a), None, "as wanted: nothing to do");
        for _ in 0..MAX_REPAIRS {
            a.note_held("x", &d(NotInuse));
            assert_eq!(a.held("x"), Some(&d(NotInuse)));
            assert_eq!(drain(&mut a), vec![("x".into(), d(Inuse))], "repaired");
        }
        a.note_held("x", &d(NotInuse));
        assert_eq!(
            nw(&mut a),
            None,
            "a sink that keeps disagreeing is left alone"
        );
        assert_eq!(a.stats().repaired, u64::from(MAX_REPAIRS));
        // A new wanted value starts over.
        a.push("x".into(), d(Busy));
        drain(&mut a);
        a.note_held("x", &d(Ringing));
        assert_eq!(drain(&mut a), vec![("x".into(), d(Busy))]);
        // Targets nobody wants are only recorded.
        a.note_held("z", &d(Inuse));
        assert_eq!(a.held("z"), Some(&d(Inuse)));
        assert_eq!(nw(&mut a), None);
        assert_eq!(a.push("z".into(), d(Inuse)), Push::Skipped);
    }

    #[test]
    fn presence_values_round_trip_through_the_compact_slot() {
        use crate::state::{Presence, PresenceStatus};
        let p = Value::Presence(Presence {
            status: PresenceStatus::Away,
            subtype: "lunch".into(),
            message: "back at 2".into(),
        });
        let mut a = q(10, 4);
        a.push("CustomPresence:alice".into(), p.clone());
        assert_eq!(
            drain(&mut a),
            vec![("CustomPresence:alice".into(), p.clone())]
        );
        assert_eq!(a.held("CustomPresence:alice"), Some(&p));
        assert_eq!(a.push("CustomPresence:alice".into(), p), Push::Skipped);
        assert_eq!(a.targets_len(), 1);
    }

    #[test]
    fn echoes_of_our_writes_are_recognised_even_repeated_and_late() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        let (t, _) = nwa(&mut a, Millis(10)).unwrap();
        assert!(
            a.is_echo("x", &d(Ringing), Millis(11)),
            "echo before the answer"
        );
        assert!(
            a.is_echo("x", &d(Ringing), Millis(12)),
            "Asterisk repeats events"
        );
        assert!(!a.is_echo("y", &d(Ringing), Millis(12)), "no write to y");
        assert_eq!(a.targets_len(), 1, "asking about an echo creates no slot");
        done(&mut a, &t, true);
        // The next write goes out before the first one's echo was read (events and answers
        // travel apart): both are expected, in order.
        a.push("x".into(), d(Inuse));
        nwa(&mut a, Millis(20)).unwrap();
        assert!(
            a.is_echo("x", &d(Ringing), Millis(21)),
            "late echo of the first write"
        );
        assert!(a.is_echo("x", &d(Inuse), Millis(22)));
        assert!(
            !a.is_echo("x", &d(Ringing), Millis(23)),
            "superseded by the newer echo"
        );
        assert_eq!(a.stats().echoes, 4);
    }

    #[test]
    fn a_different_value_is_a_real_change_and_drops_the_expectations() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Inuse));
        let (t, _) = nwa(&mut a, Millis(0)).unwrap();
        done(&mut a, &t, true);
        assert!(!a.is_echo("x", &d(Busy), Millis(1)));
        assert!(
            !a.is_echo("x", &d(Inuse), Millis(2)),
            "expectation gone after a real change"
        );
    }

    #[test]
    fn echo_expectations_are_bounded_per_target_and_in_age() {
        let mut a = q(10, 4);
        for (i, s) in [Ringing, Inuse, Busy].into_iter().enumerate() {
            a.push("x".into(), d(s));
            let (t, _) = nwa(&mut a, Millis(i as u64)).unwrap();
            done(&mut a, &t, true);
        }
        assert!(
            !a.is_echo("x", &d(Ringing), Millis(3)),
            "only the last ECHO_VALUES writes are expected"
        );
        for (i, s) in [Ringing, Inuse, Busy].into_iter().enumerate() {
            a.push("y".into(), d(s));
            let (t, _) = nwa(&mut a, Millis(i as u64)).unwrap();
            done(&mut a, &t, true);
        }
        assert!(a.is_echo("y", &d(Inuse), Millis(3)));
        assert!(a.is_echo("y", &d(Busy), Millis(3)));
        let age = ApplyConfig::default().echo_max_age_ms;
        assert!(a.is_echo("y", &d(Busy), Millis(2 + age)));
        assert!(
            !a.is_echo("y", &d(Busy), Millis(3 + age)),
            "too long after the last write"
        );
        // A restarted sink: nothing of the old one echoes.
        a.push("z".into(), d(Busy));
        nwa(&mut a, Millis(5)).unwrap();
        a.forget_echoes();
        assert!(!a.is_echo("z", &d(Busy), Millis(6)));
        // Rewriting the value already expected keeps one expectation of it, first.
        a.push("w".into(), d(Inuse));
        let (t, _) = nwa(&mut a, Millis(7)).unwrap();
        done(&mut a, &t, true);
        a.push("w".into(), d(Busy));
        let (t, _) = nwa(&mut a, Millis(7)).unwrap();
        done(&mut a, &t, false);
        a.push("w".into(), d(Inuse));
        nwa(&mut a, Millis(8)).unwrap();
        assert!(a.is_echo("w", &d(Busy), Millis(9)), "still expected");
        assert!(a.is_echo("w", &d(Inuse), Millis(9)), "newest");
        assert!(!a.is_echo("w", &d(Busy), Millis(9)), "older than the match");
    }

    #[test]
    fn presence_echoes_are_recognised_by_value() {
        use crate::state::{Presence, PresenceStatus};
        let p = |m: &str| {
            Value::Presence(Presence {
                status: PresenceStatus::Away,
                subtype: String::new(),
                message: m.into(),
            })
        };
        let mut a = q(10, 4);
        a.push("CustomPresence:a".into(), p("one"));
        nwa(&mut a, Millis(0)).unwrap();
        assert!(
            !a.is_echo("CustomPresence:a", &d(Inuse), Millis(1)),
            "other kind"
        );
        assert!(a.is_echo("CustomPresence:a", &p("one"), Millis(1)));
        assert!(!a.is_echo("CustomPresence:a", &p("two"), Millis(1)));
    }

    #[test]
    fn an_emptied_order_lets_its_burst_capacity_go() {
        let mut a = q(100_000, 64);
        for i in 0..20_000 {
            a.push(format!("k{i}"), d(Inuse));
        }
        assert!(a.q.order.capacity() >= 20_000);
        assert_eq!(drain(&mut a).len(), 20_000, "every write made");
        assert_eq!(nw(&mut a), None);
        assert!(a.q.order.capacity() <= ORDER_KEEP);
        assert_eq!(a.targets_len(), 20_000, "what the sink holds is kept");
        assert_eq!(a.push("k7".into(), d(Inuse)), Push::Skipped);
    }

    #[test]
    fn a_device_slot_is_small() {
        // The many targets are devices: a slot is one word beside its name, no allocation.
        assert_eq!(std::mem::size_of::<Packed>(), 8);
        assert_eq!(std::mem::size_of::<(CompactString, Packed)>(), 32);
        for (i, s) in STATES.into_iter().enumerate() {
            assert_eq!(s as usize, i, "STATES in declaration order");
        }
    }

    #[test]
    fn a_packed_slot_round_trips() {
        let base = Millis(1_000);
        let states = [None, Some(Invalid), Some(NotInuse), Some(Ringinuse)];
        for (i, want) in states.into_iter().enumerate() {
            let held = states[(i + 1) % 4];
            let flight = states[(i + 2) % 4];
            let s = Slot {
                want,
                held,
                flight,
                echo: [states[(i + 3) % 4], want],
                pending: i % 2 == 0,
                repairs: (i % 4) as u8,
                sent_at: Millis(base.0 + u64::from(u32::MAX) - i as u64),
                done: i % 3 == 0,
            };
            let u = Packed::pack(&s, base).unpack(base);
            assert_eq!(
                (
                    u.want, u.held, u.flight, u.echo, u.pending, u.repairs, u.sent_at, u.done
                ),
                (
                    s.want, s.held, s.flight, s.echo, s.pending, s.repairs, s.sent_at, s.done
                )
            );
        }
    }

    #[test]
    fn echo_ages_stay_exact_across_a_rebase_of_the_time_base() {
        let age = ApplyConfig::default().echo_max_age_ms;
        let mut a = q(10, 4);
        // An old write, long expired by the time the base moves.
        a.push("old".into(), d(Busy));
        nwa(&mut a, Millis(5)).unwrap();
        done(&mut a, "old", true);
        // Wall-clock milliseconds (2^40 and more) are 2^32 after the base of 0.
        let t = Millis(1 << 40);
        a.push("x".into(), d(Ringing));
        nwa(&mut a, t).unwrap();
        done(&mut a, "x", true);
        assert!(a.devices.base.0 > 0, "rebased");
        a.push("y".into(), d(Inuse));
        nwa(&mut a, Millis(t.0 + 7)).unwrap();
        assert!(a.is_echo("x", &d(Ringing), Millis(t.0 + age)));
        assert!(!a.is_echo("x", &d(Ringing), Millis(t.0 + age + 1)));
        assert!(a.is_echo("y", &d(Inuse), Millis(t.0 + 7 + age)));
        assert!(!a.is_echo("old", &d(Busy), Millis(t.0 + 8)));
        assert_eq!(
            a.held("old"),
            Some(&d(Busy)),
            "the rest of the slot is kept"
        );
    }

    #[test]
    fn targets_longer_than_the_inline_limit_behave_the_same() {
        let long = format!("Custom:PJSIP/{}", "x".repeat(40));
        let mut a = q(10, 1);
        assert_eq!(a.push(long.clone(), d(Ringing)), Push::Queued);
        assert_eq!(a.push("y".into(), d(Inuse)), Push::Queued);
        assert_eq!(a.push(long.clone(), d(Inuse)), Push::Conflated);
        assert_eq!(nwa(&mut a, Millis(1)), Some((long.clone(), d(Inuse))));
        assert_eq!(a.push(long.clone(), d(Busy)), Push::Queued, "waits");
        assert!(a.is_echo(&long, &d(Inuse), Millis(2)));
        assert!(done(&mut a, &long, true));
        assert_eq!(a.held(&long), Some(&d(Inuse)));
        assert_eq!(nw(&mut a), Some(("y".into(), d(Inuse))));
        done(&mut a, "y", true);
        assert_eq!(nw(&mut a), Some((long.clone(), d(Busy))));
        assert_eq!(a.targets_len(), 2);
    }

    #[test]
    fn a_write_completes_by_its_handle_once() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        let id = a.next_write().unwrap().id;
        assert_eq!(a.in_flight_len(), 1);
        assert!(a.complete(id, true));
        assert_eq!(a.held("x"), Some(&d(Ringing)));
        assert_eq!(a.in_flight_len(), 0);
        assert!(!a.complete(id, false), "not in flight any more");
        assert_eq!(a.held("x"), Some(&d(Ringing)), "nothing done");
        assert_eq!((a.stats().confirmed, a.stats().failed), (1, 0));
        // What the queue forgets of the sink leaves the write in flight to complete.
        a.push("x".into(), d(Busy));
        let id = a.next_write().unwrap().id;
        a.forget_held();
        a.forget_echoes();
        assert!(a.complete(id, true));
        assert_eq!(a.held("x"), Some(&d(Busy)));
    }

    /// A hinted push ([`ApplyQueue::push_device`]) does what a push by name does, whatever
    /// the hint: the id returned before (also from before a clear, when it may name another
    /// target or none), another target's, or none.
    #[test]
    fn a_hinted_push_does_what_a_push_by_name_does_whatever_the_hint() {
        use proptest::prelude::*;
        let states = [Inuse, NotInuse, Busy, Ringing];
        proptest!(ProptestConfig::with_cases(300), |(
            ops in proptest::collection::vec((0..6usize, 0..6usize, 0..4usize, 0..4u32), 1..80),
        )| {
            let (mut by_name, mut hinted) = (q(4, 2), q(4, 2));
            // Per key, the id the hinted queue returned last (kept across clears).
            let mut ids = [NO_HINT; 6];
            let mut flying: Vec<(WriteId, WriteId)> = Vec::new();
            for (op, k, s, h) in ops {
                let key = format!("Custom:PJSIP/{k}");
                match op {
                    0..=2 => {
                        let hint = match h {
                            0 => ids[k],
                            1 => ids[(k + 1) % ids.len()],
                            2 => NO_HINT,
                            _ => k as u32,
                        };
                        let want = by_name.push_ref(&key, &d(states[s]));
                        let (got, id) = hinted.push_device(&key, states[s], hint);
                        prop_assert_eq!(got, want);
                        prop_assert_eq!(Some(id), hinted.devices.id(&key));
                        ids[k] = id;
                    }
                    3 => {
                        let a = by_name.next_write_at(Millis(h.into())).map(|w| (w.id, w.target.to_owned(), w.value));
                        let b = hinted.next_write_at(Millis(h.into())).map(|w| (w.id, w.target.to_owned(), w.value));
                        prop_assert_eq!(a.as_ref().map(|w| (&w.1, &w.2)), b.as_ref().map(|w| (&w.1, &w.2)));
                        if let (Some(a), Some(b)) = (a, b) {
                            flying.push((a.0, b.0));
                        }
                    }
                    4 if !flying.is_empty() => {
                        let (a, b) = flying.remove(s % flying.len());
                        prop_assert_eq!(by_name.complete(a, h % 2 == 0), hinted.complete(b, h % 2 == 0));
                    }
                    _ => {
                        by_name.clear();
                        hinted.clear();
                    }
                }
                for k in 0..ids.len() {
                    let key = format!("Custom:PJSIP/{k}");
                    prop_assert_eq!(by_name.held(&key), hinted.held(&key));
                }
                prop_assert_eq!(by_name.pending_len(), hinted.pending_len());
                prop_assert_eq!(by_name.stats(), hinted.stats());
            }
        });
    }

    #[test]
    fn a_handle_from_before_a_clear_is_ignored() {
        let mut a = q(10, 4);
        a.push("x".into(), d(Ringing));
        let old = a.next_write().unwrap().id;
        a.clear();
        assert!(!a.complete(old, true), "its write is gone");
        // The same target (at the same id in its store) written again after the clear.
        a.push("x".into(), d(Inuse));
        let new = a.next_write().unwrap().id;
        assert_ne!(old, new);
        assert!(!a.complete(old, false), "does not complete the new write");
        assert_eq!(a.in_flight_len(), 1);
        assert_eq!(a.stats().failed, 0);
        assert!(a.complete(new, true));
        assert_eq!(a.held("x"), Some(&d(Inuse)));
        // A handle naming no target of this queue (another queue's) is ignored too.
        let mut b = q(10, 4);
        for i in 0..3 {
            b.push(format!("k{i}"), d(Busy));
        }
        let far = std::iter::from_fn(|| b.next_write().map(|w| w.id)).last();
        assert!(!a.complete(far.unwrap(), true));
    }

    #[test]
    fn handles_tell_a_device_and_a_presence_target_of_one_name_apart() {
        use crate::state::{Presence, PresenceStatus};
        let p = Value::Presence(Presence {
            status: PresenceStatus::Away,
            subtype: String::new(),
            message: String::new(),
        });
        let mut a = q(10, 4);
        a.push("same".into(), d(Inuse));
        a.push("same".into(), p.clone());
        let dev = a.next_write().unwrap().id;
        let pres = a.next_write().unwrap();
        assert_eq!((pres.target, &pres.value), ("same", &p));
        let pres = pres.id;
        assert!(a.complete(pres, false));
        assert_eq!(a.in_flight_len(), 1, "the device write still flies");
        assert!(a.held("same").is_none());
        assert!(!a.complete(pres, true));
        assert!(a.complete(dev, true));
        assert_eq!(a.held("same"), Some(&d(Inuse)));
    }

    #[test]
    fn full_queue_refuses_and_flags() {
        let mut a = q(2, 1);
        a.push("a".into(), d(Inuse));
        a.push("b".into(), d(Inuse));
        assert_eq!(a.push("c".into(), d(Inuse)), Push::Overflow);
        assert_eq!(
            a.push("a".into(), d(Busy)),
            Push::Conflated,
            "existing keys still conflate"
        );
        assert!(a.take_overflow());
        assert!(!a.take_overflow());
        a.clear();
        assert_eq!(a.pending_len(), 0);
    }
}
