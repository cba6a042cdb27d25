//! The simulated PBX's state, sans-IO: device states (the stasis cache and astdb of real
//! Asterisk), presence, hints and their aggregate extension state, calls, global variables.
//!
//! Every mutation returns the manager events it causes, in the order the simulator sends them;
//! the server broadcasts them. The rules follow Asterisk's `devicestate.c`, `pbx.c`,
//! `func_devstate.c` and `func_presencestate.c`, as the captures in
//! `shared/fixtures/asterisk/` show them:
//! - cached device states (`Custom:` devices and phones) emit `DeviceStateChange` only when the
//!   state changes; `Local/` devices are not cached and emit it on every publish, twice per
//!   change (one per Local channel half); phones emit it twice too when `phone_duplicates`;
//! - for every `DeviceStateChange`, each hint holding the device is re-aggregated and an
//!   `ExtensionStatus` is sent when its state changed, or again when it includes Ringing
//!   (Asterisk's extended-callback rule, which is why the capture shows two `Status: 9`);
//! - `Custom:` states are persisted (astdb) and come back after a restart under the name after
//!   the last `/` of the key (the `Custom:Local/100@phones` → `Custom:100@phones` quirk).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;

use base64::Engine as _;
use compact_str::CompactString;
use hintfed_ami::Message;

use crate::event::{self, SimEvent};
use crate::extensions::Hint;
use crate::keys;

/// `enum ast_device_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// `UNKNOWN`
    Unknown,
    /// `NOT_INUSE`
    NotInuse,
    /// `INUSE`
    Inuse,
    /// `BUSY`
    Busy,
    /// `INVALID`
    Invalid,
    /// `UNAVAILABLE`
    Unavailable,
    /// `RINGING`
    Ringing,
    /// `RINGINUSE`
    RingInuse,
    /// `ONHOLD`
    Onhold,
}

impl DeviceState {
    /// Every state, in enum order.
    pub const ALL: [DeviceState; 9] = [
        Self::Unknown,
        Self::NotInuse,
        Self::Inuse,
        Self::Busy,
        Self::Invalid,
        Self::Unavailable,
        Self::Ringing,
        Self::RingInuse,
        Self::Onhold,
    ];

    /// `ast_devstate_str`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::NotInuse => "NOT_INUSE",
            Self::Inuse => "INUSE",
            Self::Busy => "BUSY",
            Self::Invalid => "INVALID",
            Self::Unavailable => "UNAVAILABLE",
            Self::Ringing => "RINGING",
            Self::RingInuse => "RINGINUSE",
            Self::Onhold => "ONHOLD",
        }
    }

    /// `ast_devstate_val`: case-insensitive; anything unrecognised (including `UNKNOWN`) is
    /// `Unknown`.
    pub fn from_val(s: &str) -> Self {
        Self::parse(s).unwrap_or(Self::Unknown)
    }

    /// A strict parse of a state name (case-insensitive), `None` if it names no state.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
    }

    fn order(self) -> u8 {
        match self {
            Self::Unknown => 1,
            Self::NotInuse => 3,
            Self::Inuse => 6,
            Self::Busy => 7,
            Self::Invalid => 0,
            Self::Unavailable => 2,
            Self::Ringing => 5,
            Self::RingInuse => 8,
            Self::Onhold => 4,
        }
    }

    /// `ast_devstate_to_extenstate`.
    pub fn to_extension_state(self) -> i32 {
        match self {
            Self::Onhold => 16,
            Self::Busy => 2,
            Self::Unknown | Self::NotInuse => 0,
            Self::Unavailable | Self::Invalid => 4,
            Self::RingInuse => 9,
            Self::Ringing => 8,
            Self::Inuse => 1,
        }
    }
}

/// `ast_devstate_aggregate_*` over `states` (the current Asterisk rules).
pub fn aggregate(states: impl IntoIterator<Item = DeviceState>) -> DeviceState {
    let (mut ringing, mut inuse) = (false, false);
    let mut agg = DeviceState::Invalid;
    for s in states {
        match s {
            DeviceState::Ringing => ringing = true,
            DeviceState::Inuse | DeviceState::Onhold | DeviceState::Busy => inuse = true,
            _ => {}
        }
        if ringing && inuse {
            agg = DeviceState::RingInuse;
        } else if s.order() > agg.order() {
            agg = s;
        }
    }
    agg
}

/// `ast_extension_state2str`.
pub fn extension_state_text(state: i32) -> &'static str {
    match state {
        0 => "Idle",
        1 => "InUse",
        2 => "Busy",
        4 => "Unavailable",
        8 => "Ringing",
        9 => "InUse&Ringing",
        16 => "Hold",
        17 => "InUse&Hold",
        _ => "Unknown",
    }
}

/// `enum ast_presence_state` (without `INVALID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceState {
    /// `not_set`
    NotSet,
    /// `unavailable`
    Unavailable,
    /// `available`
    Available,
    /// `away`
    Away,
    /// `xa`
    Xa,
    /// `chat`
    Chat,
    /// `dnd`
    Dnd,
}

impl PresenceState {
    const ALL: [PresenceState; 7] = [
        Self::NotSet,
        Self::Unavailable,
        Self::Available,
        Self::Away,
        Self::Xa,
        Self::Chat,
        Self::Dnd,
    ];

    /// `ast_presence_state2str`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotSet => "not_set",
            Self::Unavailable => "unavailable",
            Self::Available => "available",
            Self::Away => "away",
            Self::Xa => "xa",
            Self::Chat => "chat",
            Self::Dnd => "dnd",
        }
    }

    /// `ast_presence_state_val` (case-insensitive), `None` for `AST_PRESENCE_INVALID`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

/// A presence: state, subtype and message (decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The state.
    pub state: PresenceState,
    /// The subtype, may be empty.
    pub subtype: String,
    /// The message, may be empty.
    pub message: String,
}

impl Presence {
    /// `not_set` with empty subtype and message.
    pub fn not_set() -> Self {
        Self {
            state: PresenceState::NotSet,
            subtype: String::new(),
            message: String::new(),
        }
    }
}

/// `func_presencestate.c`'s `parse_data`: `status,subtype,message[,options]`; with option `e`
/// subtype and message are base64 and are returned decoded. `None` where Asterisk refuses.
pub fn parse_presence_value(value: &str) -> Option<Presence> {
    let mut parts = value.splitn(4, ',');
    let state = parts.next().filter(|s| !s.is_empty())?;
    let state = PresenceState::parse(state)?;
    let subtype = parts.next().unwrap_or("");
    let message = parts.next().unwrap_or("");
    // strsep leaves anything after a 4th comma out of the options.
    let options = parts.next().unwrap_or("").split(',').next().unwrap_or("");
    if !options.is_empty() && !options.contains('e') {
        return None;
    }
    let decode = |s: &str| -> String {
        if options.contains('e') {
            base64_lenient(s)
        } else {
            s.to_owned()
        }
    };
    Some(Presence {
        state,
        subtype: decode(subtype),
        message: decode(message),
    })
}

/// Decodes base64 the way `ast_base64decode` does: stops at the first byte outside the
/// alphabet, never fails.
fn base64_lenient(s: &str) -> String {
    let clean: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/')
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(clean.as_bytes())
        .or_else(|_| {
            // A dangling 6-bit group: drop it like the C decoder does.
            let cut = clean.len() - clean.len() % 4;
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(&clean.as_bytes()[..cut])
        })
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why a `Setvar` is refused (`Message: Variable not set`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetvarError {
    /// `DEVICE_STATE` can only set `Custom:` devices.
    #[error("DEVICE_STATE can only set Custom: devices")]
    NotCustom,
    /// An empty `Custom:` name.
    #[error("no custom device name")]
    EmptyName,
    /// The state is `UNKNOWN` or not a state name.
    #[error("invalid device state value")]
    InvalidState,
    /// `PRESENCE_STATE` can only set `CustomPresence:` providers.
    #[error("PRESENCE_STATE can only set CustomPresence: providers")]
    NotCustomPresence,
    /// Bad `status,subtype,message[,e]`.
    #[error("invalid PRESENCE_STATE arguments")]
    InvalidPresence,
    /// A function the simulator does not have.
    #[error("unknown function")]
    UnknownFunction,
}

/// One hint and what Asterisk remembers of it.
#[derive(Debug, Clone)]
pub struct HintState {
    /// The hint.
    pub hint: Hint,
    /// `hint->laststate`: the last extension state reported.
    pub last_state: i32,
    /// The last presence reported.
    pub last_presence: Presence,
}

/// Options of the model.
#[derive(Debug, Clone)]
pub struct PbxOptions {
    /// `SystemName` put on events, if any.
    pub system_name: Option<String>,
    /// Phones (non-`Custom:`, non-`Local/` devices) emit each `DeviceStateChange` twice.
    pub phone_duplicates: bool,
}

/// A hash map with short keys inline, hashed with foldhash (seeded per process).
type FastMap<V> = HashMap<CompactString, V, foldhash::fast::RandomState>;

/// A [`Cache`] entry's place in first-cached order, counted from 1: an `Option` of it takes
/// no more room than it, so an astdb entry (and an absent one, in a server's
/// [`keys::Table`]) fits 8 bytes, eight to a cache line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot(NonZeroU32);

impl Slot {
    /// The slot of the entry at `index` (more than 4 billion entries would not fit in memory
    /// anyway).
    fn at(index: usize) -> Self {
        let n = u32::try_from(index).map_or(u32::MAX, |i| i.saturating_add(1));
        Self(NonZeroU32::new(n).unwrap_or(NonZeroU32::MAX))
    }

    /// The entry's index.
    fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// An ordered map with case-insensitive keys that remembers the name as first written. Each
/// entry has a slot (its place in first-cached order) that stays until the cache is cleared.
#[derive(Debug, Clone)]
struct Cache<V> {
    /// Names as first written, by slot.
    names: Vec<String>,
    /// Values, by slot (apart from the names: the values of many entries share a cache line).
    values: Vec<V>,
    /// Lower-cased name → slot.
    index: FastMap<Slot>,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            names: Vec::new(),
            values: Vec::new(),
            index: FastMap::default(),
        }
    }
}

/// Calls `f` with `name` lower-cased (ASCII), without allocating for names of up to 64 bytes.
fn with_lower<R>(name: &str, f: impl FnOnce(&str) -> R) -> R {
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return f(name);
    }
    let mut buf = [0u8; 64];
    if let Some(dst) = buf.get_mut(..name.len()) {
        dst.copy_from_slice(name.as_bytes());
        dst.make_ascii_lowercase();
        // Lower-casing ASCII keeps UTF-8 valid.
        if let Ok(lower) = std::str::from_utf8(dst) {
            return f(lower);
        }
    }
    f(&name.to_ascii_lowercase())
}

impl<V: Clone> Cache<V> {
    fn get(&self, name: &str) -> Option<&V> {
        with_lower(name, |key| self.index.get(key).copied())
            .and_then(|slot| self.values.get(slot.index()))
    }
    fn insert(&mut self, name: &str, v: V) {
        self.replace(name, v);
    }
    /// Sets `name` to `v`: its slot, and the value it had.
    fn replace(&mut self, name: &str, v: V) -> (Slot, Option<V>) {
        let Self {
            names,
            values,
            index,
        } = self;
        with_lower(name, |key| match index.get(key) {
            Some(&slot) => (
                slot,
                values
                    .get_mut(slot.index())
                    .map(|old| std::mem::replace(old, v)),
            ),
            None => {
                let slot = Slot::at(names.len());
                index.insert(CompactString::new(key), slot);
                names.push(name.to_owned());
                values.push(v);
                (slot, None)
            }
        })
    }
    /// Sets the entry of `slot` (as [`Cache::replace`] returned it since the last
    /// [`Cache::clear`]) to `v`; the value it had.
    fn replace_slot(&mut self, slot: Slot, v: V) -> Option<V> {
        self.values
            .get_mut(slot.index())
            .map(|old| std::mem::replace(old, v))
    }
    /// Every entry, in first-cached order, named as first written.
    fn items(&self) -> Vec<(String, V)> {
        self.names
            .iter()
            .cloned()
            .zip(self.values.iter().cloned())
            .collect()
    }
    fn clear(&mut self) {
        self.names.clear();
        self.values.clear();
        self.index.clear();
    }
}

/// An astdb `CustomDevstate` entry.
#[derive(Debug, Clone, Copy)]
struct DbDevstate {
    /// `ast_devstate_val` of the value as written (every reader of the family reads it
    /// through that).
    state: DeviceState,
    /// The cache slot of `Custom:<key>`, once this key was set since the cache was last
    /// cleared: a `Setvar` then finds both entries with one lookup (the cache's key is the
    /// lower-cased device, which depends only on this key).
    slot: Option<Slot>,
}

/// Events as the server hands them out: the copies of a duplicated publication share one
/// event.
pub(crate) type Events = Vec<Arc<SimEvent>>;

/// [`Events`] as the public API returns them.
fn unshare(events: Events) -> Vec<SimEvent> {
    events.into_iter().map(Arc::unwrap_or_clone).collect()
}

/// The simulated PBX.
#[derive(Debug)]
pub struct Pbx {
    opts: PbxOptions,
    hints: Vec<HintState>,
    /// The device state cache (what `DeviceStateList` shows), in first-cached order.
    cache: Cache<DeviceState>,
    /// astdb family `CustomDevstate`: key (name after `Custom:`, numbered for the process)
    /// → its entry.
    db_devstate: keys::Table<DbDevstate>,
    /// astdb family `CustomPresence`: key → value as written.
    db_presence: BTreeMap<String, String>,
    /// The presence cache (what `PresenceStateList` shows).
    presence: Cache<Presence>,
    globals: BTreeMap<String, String>,
    initial_globals: Vec<(String, String)>,
    /// Active calls per device (lower-cased name).
    calls: HashMap<String, u32>,
    /// Last state published for uncached (`Local/`) devices (lower-cased name): what the
    /// Local channel driver would report.
    uncached: FastMap<DeviceState>,
    next_channel: u32,
    next_uniqueid: u64,
}

impl Pbx {
    /// A freshly booted PBX with these hints and `[globals]`.
    pub fn new(hints: Vec<Hint>, globals: Vec<(String, String)>, opts: PbxOptions) -> Self {
        let mut pbx = Self {
            opts,
            hints: hints
                .into_iter()
                .map(|hint| HintState {
                    hint,
                    last_state: 0,
                    last_presence: Presence::not_set(),
                })
                .collect(),
            cache: Cache::default(),
            db_devstate: keys::Table::default(),
            db_presence: BTreeMap::new(),
            presence: Cache::default(),
            globals: BTreeMap::new(),
            initial_globals: globals,
            calls: HashMap::new(),
            uncached: FastMap::default(),
            next_channel: 0,
            next_uniqueid: 1,
        };
        pbx.boot();
        pbx
    }

    /// The `SystemName`, if any.
    pub fn system_name(&self) -> Option<&str> {
        self.opts.system_name.as_deref()
    }

    fn boot(&mut self) {
        self.globals = self.initial_globals.iter().cloned().collect();
        // func_devstate's load_module: republish every astdb entry under the name after the
        // last '/' of its key.
        // In key order, as astdb lists them.
        let (ids, states): (Vec<keys::KeyId>, Vec<DeviceState>) =
            self.db_devstate.iter().map(|(id, e)| (id, e.state)).unzip();
        let mut db: Vec<(CompactString, DeviceState)> =
            keys::names(ids).into_iter().zip(states).collect();
        db.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let restored: Vec<(String, DeviceState)> = db
            .into_iter()
            .map(|(key, state)| {
                let name = key.rsplit('/').next().unwrap_or(&key);
                (format!("Custom:{name}"), state)
            })
            .collect();
        for (name, state) in restored {
            self.cache.insert(&name, state);
        }
        for i in 0..self.hints.len() {
            self.hints[i].last_state = self.hint_state(&self.hints[i].hint);
            self.hints[i].last_presence = self.hint_presence(&self.hints[i].hint);
        }
    }

    /// A simulated restart: caches, calls and globals are lost, astdb survives (with the rename
    /// quirk on the way back in). Emits nothing (nobody is connected during a restart).
    pub fn restart(&mut self) {
        self.cache.clear();
        for entry in self.db_devstate.values_mut() {
            entry.slot = None;
        }
        self.presence.clear();
        self.calls.clear();
        self.uncached.clear();
        self.next_channel = 0;
        self.next_uniqueid = 1;
        self.boot();
    }

    fn event(&self, name: &str, category: u32, body: Message) -> SimEvent {
        SimEvent::new(name, category, self.system_name(), body)
    }

    /// `ast_device_state(device)`: the cache first, then the provider.
    pub fn device_state(&self, device: &str) -> DeviceState {
        if let Some(s) = self.cache.get(device) {
            return *s;
        }
        if let Some((tech, rest)) = device.split_once('/') {
            if tech.eq_ignore_ascii_case("Local") {
                return with_lower(device, |key| self.uncached.get(key).copied())
                    .unwrap_or(DeviceState::NotInuse);
            }
            if tech.contains(':') || rest.is_empty() {
                // e.g. "Custom:Local/100@phones" not in the cache: no channel tech "Custom:Local".
                return DeviceState::Invalid;
            }
            // A simulated phone nobody changed yet: registered and idle.
            return DeviceState::NotInuse;
        }
        match device.split_once(':') {
            Some((provider, name)) if provider.eq_ignore_ascii_case("Custom") => self
                .db_devstate
                .get(name)
                .map_or(DeviceState::Unknown, |entry| entry.state),
            _ => DeviceState::Invalid,
        }
    }

    fn hint_state(&self, hint: &Hint) -> i32 {
        aggregate(hint.devices.iter().map(|d| self.device_state(d))).to_extension_state()
    }

    /// The presence of `provider` (`ast_presence_state`): cache, then astdb.
    pub fn presence_state(&self, provider: &str) -> Presence {
        if let Some(p) = self.presence.get(provider) {
            return p.clone();
        }
        self.presence_nocache(provider)
    }

    fn presence_nocache(&self, provider: &str) -> Presence {
        match provider.split_once(':') {
            Some((p, name)) if p.eq_ignore_ascii_case("CustomPresence") => self
                .db_presence
                .get(name)
                .and_then(|raw| parse_presence_value(raw))
                .unwrap_or_else(Presence::not_set),
            _ => Presence::not_set(),
        }
    }

    fn hint_presence(&self, hint: &Hint) -> Presence {
        hint.presence
            .as_deref()
            .map_or_else(Presence::not_set, |p| self.presence_state(p))
    }

    /// Publishes `state` for `device`; `cached` as Asterisk's `AST_DEVSTATE_CACHABLE`;
    /// `copies` how many times the same publication happens (2 for Local channel halves).
    fn publish(&mut self, device: &str, state: DeviceState, cached: bool, copies: usize) -> Events {
        if cached {
            if self.cache.replace(device, state).1 == Some(state) {
                return Vec::new();
            }
        } else {
            with_lower(device, |key| match self.uncached.get_mut(key) {
                Some(s) => *s = state,
                None => {
                    self.uncached.insert(CompactString::new(key), state);
                }
            });
        }
        self.announce(device, state, copies)
    }

    /// The events of a publication of `state` for `device` that changed it (or was not
    /// cached): its `DeviceStateChange` `copies` times, and what the hints holding it report.
    fn announce(&mut self, device: &str, state: DeviceState, copies: usize) -> Events {
        let dsc = Arc::new(SimEvent::with_body(
            "DeviceStateChange",
            event::CALL,
            self.system_name(),
            &[("Device", device), ("State", state.as_str())],
        ));
        let mut out = Vec::with_capacity(copies);
        for _ in 1..copies {
            out.push(dsc.clone());
        }
        out.push(dsc);
        if !self.hints.is_empty() {
            for _ in 0..copies {
                let evs = self.reevaluate_hints(device);
                out.extend(evs.into_iter().map(Arc::new));
            }
        }
        out
    }

    fn reevaluate_hints(&mut self, device: &str) -> Vec<SimEvent> {
        let mut out = Vec::new();
        for i in 0..self.hints.len() {
            if !self.hints[i].hint.has_device(device) {
                continue;
            }
            let state = self.hint_state(&self.hints[i].hint);
            let changed = state != self.hints[i].last_state;
            self.hints[i].last_state = state;
            if changed || state & 8 != 0 {
                let ev = self.extension_status_event(&self.hints[i].hint, state);
                out.push(ev);
            }
        }
        out
    }

    fn extension_status_event(&self, hint: &Hint, state: i32) -> SimEvent {
        self.event(
            "ExtensionStatus",
            event::CALL,
            Message::new()
                .with("Exten", hint.exten.clone())
                .with("Context", hint.context.clone())
                .with("Hint", hint.app.clone())
                .with("Status", state.to_string())
                .with("StatusText", extension_state_text(state)),
        )
    }

    /// `Set(DEVICE_STATE(<device>)=<value>)`.
    pub fn set_device_state_var(
        &mut self,
        device: &str,
        value: &str,
    ) -> Result<Vec<SimEvent>, SetvarError> {
        self.device_state_var_events(device, value).map(unshare)
    }

    /// [`Pbx::set_device_state_var`] with its events as the server sends them.
    fn device_state_var_events(
        &mut self,
        device: &str,
        value: &str,
    ) -> Result<Events, SetvarError> {
        let Some(name) = strip_prefix_ci(device, "Custom:") else {
            return Err(SetvarError::NotCustom);
        };
        if name.is_empty() {
            return Err(SetvarError::EmptyName);
        }
        let state = DeviceState::from_val(value);
        if state == DeviceState::Unknown {
            return Err(SetvarError::InvalidState);
        }
        let id = keys::intern(name);
        let slot = match self.db_devstate.get_mut(id) {
            Some(entry) => {
                entry.state = state;
                entry.slot
            }
            None => {
                self.db_devstate
                    .insert(id, DbDevstate { state, slot: None });
                None
            }
        };
        let device = if device.starts_with("Custom:") {
            Cow::Borrowed(device)
        } else {
            Cow::Owned(format!("Custom:{name}"))
        };
        // The cache entry (the cached publication of `func_devstate`).
        let old = match slot {
            Some(slot) => self.cache.replace_slot(slot, state),
            None => {
                let (slot, old) = self.cache.replace(&device, state);
                if let Some(entry) = self.db_devstate.get_mut(id) {
                    entry.slot = Some(slot);
                }
                old
            }
        };
        if old == Some(state) {
            return Ok(Vec::new());
        }
        Ok(self.announce(&device, state, 1))
    }

    /// Sets any device's state the way the simulator's phones change (`SimSetDeviceState`, the
    /// script and the random load). `Custom:` devices go through `DEVICE_STATE` (and may then
    /// not be `UNKNOWN`); `Local/` devices publish uncached; phones cached, twice when
    /// `phone_duplicates`.
    pub fn set_device_state(
        &mut self,
        device: &str,
        state: DeviceState,
    ) -> Result<Vec<SimEvent>, SetvarError> {
        self.device_state_events(device, state).map(unshare)
    }

    /// [`Pbx::set_device_state`] with its events as the server sends them.
    pub(crate) fn device_state_events(
        &mut self,
        device: &str,
        state: DeviceState,
    ) -> Result<Events, SetvarError> {
        if strip_prefix_ci(device, "Custom:").is_some() {
            return self.device_state_var_events(device, state.as_str());
        }
        if is_local(device) {
            return Ok(self.publish(device, state, false, 2));
        }
        let copies = if self.opts.phone_duplicates { 2 } else { 1 };
        Ok(self.publish(device, state, true, copies))
    }

    /// `Set(PRESENCE_STATE(<provider>)=<value>)`.
    pub fn set_presence_var(
        &mut self,
        provider: &str,
        value: &str,
    ) -> Result<Vec<SimEvent>, SetvarError> {
        let Some(name) = strip_prefix_ci(provider, "CustomPresence:") else {
            return Err(SetvarError::NotCustomPresence);
        };
        if name.is_empty() {
            return Err(SetvarError::EmptyName);
        }
        let presence = parse_presence_value(value).ok_or(SetvarError::InvalidPresence)?;
        self.db_presence.insert(name.to_owned(), value.to_owned());
        self.presence.insert(provider, presence.clone());
        let mut out = vec![
            self.event(
                "PresenceStateChange",
                event::CALL,
                Message::new()
                    .with("Presentity", provider)
                    .with("Status", presence.state.as_str())
                    .with("Subtype", presence.subtype.clone())
                    .with("Message", presence.message.clone()),
            ),
        ];
        for i in 0..self.hints.len() {
            let matches = self.hints[i]
                .hint
                .presence
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case(provider));
            if !matches || self.hints[i].last_presence == presence {
                continue;
            }
            self.hints[i].last_presence = presence.clone();
            let h = &self.hints[i].hint;
            out.push(
                self.event(
                    "PresenceStatus",
                    event::CALL,
                    Message::new()
                        .with("Exten", h.exten.clone())
                        .with("Context", h.context.clone())
                        .with("Hint", h.app.clone())
                        .with("Status", presence.state.as_str())
                        .with("Subtype", presence.subtype.clone())
                        .with("Message", presence.message.clone()),
                ),
            );
        }
        Ok(out)
    }

    /// `pbx_builtin_setvar_helper` without a channel: functions or global variables.
    pub fn setvar(&mut self, variable: &str, value: &str) -> Result<Vec<SimEvent>, SetvarError> {
        self.setvar_events(variable, value).map(unshare)
    }

    /// [`Pbx::setvar`] with its events as the server sends them.
    pub(crate) fn setvar_events(
        &mut self,
        variable: &str,
        value: &str,
    ) -> Result<Events, SetvarError> {
        match split_function(variable) {
            Some((f, arg)) if f.eq_ignore_ascii_case("DEVICE_STATE") => {
                self.device_state_var_events(arg, value)
            }
            Some((f, arg)) if f.eq_ignore_ascii_case("PRESENCE_STATE") => self
                .set_presence_var(arg, value)
                .map(|evs| evs.into_iter().map(Arc::new).collect()),
            Some(_) => Err(SetvarError::UnknownFunction),
            None => {
                self.globals.insert(variable.to_owned(), value.to_owned());
                Ok(Vec::new())
            }
        }
    }

    /// What `Getvar` answers in `Value:` (empty where Asterisk's function fails).
    pub fn getvar(&self, variable: &str) -> String {
        match split_function(variable) {
            Some((f, arg)) if f.eq_ignore_ascii_case("DEVICE_STATE") => {
                if arg.is_empty() {
                    String::new()
                } else {
                    self.device_state(arg).as_str().to_owned()
                }
            }
            Some((f, arg)) if f.eq_ignore_ascii_case("PRESENCE_STATE") => {
                self.presence_read(arg).unwrap_or_default()
            }
            Some(_) => String::new(),
            None => self.globals.get(variable).cloned().unwrap_or_default(),
        }
    }

    fn presence_read(&self, args: &str) -> Option<String> {
        let mut it = args.split(',');
        let provider = it.next().filter(|s| !s.is_empty())?;
        let field = it.next().filter(|s| !s.is_empty())?;
        let options = it.next().unwrap_or("");
        let (p, _) = provider.split_once(':')?;
        if !p.eq_ignore_ascii_case("CustomPresence") {
            return None;
        }
        let presence = self.presence_nocache(provider);
        let encode = |s: &str| {
            if options.contains('e') {
                base64::engine::general_purpose::STANDARD.encode(s)
            } else {
                s.to_owned()
            }
        };
        Some(
            if field.eq_ignore_ascii_case("subtype") && !presence.subtype.is_empty() {
                encode(&presence.subtype)
            } else if field.eq_ignore_ascii_case("message") && !presence.message.is_empty() {
                encode(&presence.message)
            } else if field.eq_ignore_ascii_case("value") {
                presence.state.as_str().to_owned()
            } else {
                String::new()
            },
        )
    }

    /// A call on `device` starts (answered): the device goes INUSE.
    pub fn call_start(&mut self, device: &str) -> Vec<SimEvent> {
        *self.calls.entry(device.to_ascii_lowercase()).or_insert(0) += 1;
        self.set_device_state(device, DeviceState::Inuse)
            .unwrap_or_default()
    }

    /// A call on `device` ends; when none is left it goes NOT_INUSE. A call unknown (e.g. lost
    /// to a restart) changes nothing.
    pub fn call_end(&mut self, device: &str) -> Vec<SimEvent> {
        let key = device.to_ascii_lowercase();
        let Some(n) = self.calls.get_mut(&key) else {
            return Vec::new();
        };
        *n -= 1;
        if *n > 0 {
            return Vec::new();
        }
        self.calls.remove(&key);
        self.set_device_state(device, DeviceState::NotInuse)
            .unwrap_or_default()
    }

    /// Calls in progress (`CoreCurrentCalls`).
    pub fn active_calls(&self) -> u32 {
        self.calls.values().sum()
    }

    /// Allocates a channel number (`Local/x@y-0000000N`) and two unique id sequence numbers.
    pub fn next_channel(&mut self) -> (u32, u64) {
        let ch = self.next_channel;
        self.next_channel += 1;
        let id = self.next_uniqueid;
        self.next_uniqueid += 2;
        (ch, id)
    }

    /// The cached device states, in first-cached order.
    pub fn device_list(&self) -> Vec<(String, DeviceState)> {
        self.cache.items()
    }

    /// The cached presence states.
    pub fn presence_list(&self) -> Vec<(String, Presence)> {
        self.presence.items()
    }

    /// The hints with their last reported states.
    pub fn hints(&self) -> &[HintState] {
        &self.hints
    }

    /// The hint `exten@context` (case-insensitive context), with its current extension state.
    pub fn extension_state(&self, exten: &str, context: &str) -> Option<(&Hint, i32, Presence)> {
        self.hints
            .iter()
            .find(|h| h.hint.exten == exten && h.hint.context.eq_ignore_ascii_case(context))
            .map(|h| {
                (
                    &h.hint,
                    self.hint_state(&h.hint),
                    self.hint_presence(&h.hint),
                )
            })
    }

    /// Number of global variables (for tests and stats).
    pub fn global(&self, name: &str) -> Option<&str> {
        self.globals.get(name).map(String::as_str)
    }
}

fn is_local(device: &str) -> bool {
    strip_prefix_ci(device, "Local/").is_some()
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// `NAME(args)` → (`NAME`, `args`); `None` for a plain variable.
fn split_function(variable: &str) -> Option<(&str, &str)> {
    let v = variable.trim();
    if !v.ends_with(')') {
        return None;
    }
    let open = v.find('(')?;
    Some((&v[..open], &v[open + 1..v.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_pbx() -> Pbx {
        let hints = vec![
            Hint::new("100", "test", "Local/100@phones&Custom:Local/100@phones"),
            Hint::new("200", "test", "Local/200@phones&Custom:Local/200@phones"),
            Hint::new("300", "test", "Custom:dnd300"),
            Hint::new("400", "test", "Custom:shared400,CustomPresence:alice"),
        ];
        Pbx::new(
            hints,
            vec![],
            PbxOptions {
                system_name: Some("pbx-a".into()),
                phone_duplicates: true,
            },
        )
    }

    fn names(evs: &[SimEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| {
                let m = e.message();
                format!(
                    "{}:{}",
                    m.get("Event").unwrap_or(""),
                    m.get("State").or(m.get("Status")).unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn an_astdb_entry_fits_8_bytes_and_slots_count_from_one() {
        assert_eq!(std::mem::size_of::<Option<DbDevstate>>(), 8);
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 4);
        for i in [0, 1, 8_999] {
            assert_eq!(Slot::at(i).index(), i);
        }
    }

    #[test]
    fn aggregation_rules() {
        use DeviceState::*;
        assert_eq!(aggregate([NotInuse, Ringing]), Ringing);
        assert_eq!(aggregate([Inuse, Ringing]), RingInuse);
        assert_eq!(aggregate([Ringing, Onhold]), RingInuse);
        assert_eq!(aggregate([Unknown]), Unknown);
        assert_eq!(aggregate([NotInuse, Invalid]), NotInuse);
        assert_eq!(aggregate([Unavailable, Unknown]), Unavailable);
        assert_eq!(aggregate([Busy, Inuse]), Busy);
        assert_eq!(aggregate([]), Invalid);
        assert_eq!(Unknown.to_extension_state(), 0);
        assert_eq!(Invalid.to_extension_state(), 4);
        assert_eq!(extension_state_text(9), "InUse&Ringing");
        assert_eq!(extension_state_text(-1), "Unknown");
    }

    #[test]
    fn devstate_val_is_case_insensitive_and_unknown_for_garbage() {
        assert_eq!(DeviceState::from_val("inuse"), DeviceState::Inuse);
        assert_eq!(DeviceState::from_val("FOO"), DeviceState::Unknown);
    }

    #[test]
    fn custom_setvar_acceptance_like_the_capture() {
        let mut pbx = fixture_pbx();
        let ev = pbx
            .setvar("DEVICE_STATE(Custom:dnd300)", "INUSE")
            .expect("set");
        assert_eq!(names(&ev), ["DeviceStateChange:INUSE", "ExtensionStatus:1"]);
        let ev = pbx
            .setvar("DEVICE_STATE(Custom:Local/100@phones)", "RINGING")
            .expect("set");
        assert_eq!(
            names(&ev),
            ["DeviceStateChange:RINGING", "ExtensionStatus:8"]
        );
        assert_eq!(
            pbx.setvar("DEVICE_STATE(Custom:dnd300)", "UNKNOWN"),
            Err(SetvarError::InvalidState)
        );
        assert_eq!(
            pbx.setvar("DEVICE_STATE(Custom:dnd300)", "bogus"),
            Err(SetvarError::InvalidState)
        );
        assert_eq!(
            pbx.setvar("DEVICE_STATE(PJSIP/100)", "INUSE"),
            Err(SetvarError::NotCustom)
        );
        // Same state again: cached, so no event.
        assert!(
            pbx.setvar("DEVICE_STATE(Custom:dnd300)", "inuse")
                .expect("set")
                .is_empty()
        );
        assert_eq!(pbx.getvar("DEVICE_STATE(Custom:dnd300)"), "INUSE");
        assert_eq!(pbx.getvar("DEVICE_STATE(Local/100@phones)"), "NOT_INUSE");
        assert_eq!(pbx.getvar("DEVICE_STATE(Custom:never)"), "UNKNOWN");
    }

    #[test]
    fn local_call_emits_duplicates_and_ringing_repeats() {
        let mut pbx = fixture_pbx();
        pbx.setvar("DEVICE_STATE(Custom:Local/100@phones)", "RINGING")
            .expect("set");
        let ev = pbx.call_start("Local/100@phones");
        assert_eq!(
            names(&ev),
            [
                "DeviceStateChange:INUSE",
                "DeviceStateChange:INUSE",
                "ExtensionStatus:9",
                "ExtensionStatus:9"
            ]
        );
        let ev = pbx.call_end("Local/100@phones");
        assert_eq!(
            names(&ev),
            [
                "DeviceStateChange:NOT_INUSE",
                "DeviceStateChange:NOT_INUSE",
                "ExtensionStatus:8",
                "ExtensionStatus:8"
            ]
        );
        // Local devices are not cached.
        let listed: Vec<String> = pbx.device_list().into_iter().map(|(d, _)| d).collect();
        assert_eq!(listed, ["Custom:Local/100@phones"]);
        assert!(pbx.call_end("Local/100@phones").is_empty());
    }

    #[test]
    fn no_ringing_means_one_extension_status() {
        let mut pbx = fixture_pbx();
        let ev = pbx.call_start("Local/200@phones");
        assert_eq!(
            names(&ev),
            [
                "DeviceStateChange:INUSE",
                "DeviceStateChange:INUSE",
                "ExtensionStatus:1"
            ]
        );
    }

    #[test]
    fn presence_plain_and_base64() {
        let mut pbx = fixture_pbx();
        let ev = pbx
            .setvar(
                "PRESENCE_STATE(CustomPresence:alice)",
                "away,lunch,back at 2",
            )
            .expect("set");
        assert_eq!(
            names(&ev),
            ["PresenceStateChange:away", "PresenceStatus:away"]
        );
        let ev = pbx
            .setvar(
                "PRESENCE_STATE(CustomPresence:alice)",
                "dnd,bWVldGluZywgcm9vbSA0,aW4gYSBtZWV0aW5nLCBzb3JyeQ==,e",
            )
            .expect("set");
        assert_eq!(ev[1].message().get("Subtype"), Some("meeting, room 4"));
        assert_eq!(ev[1].message().get("Message"), Some("in a meeting, sorry"));
        assert_eq!(
            pbx.getvar("PRESENCE_STATE(CustomPresence:alice,value)"),
            "dnd"
        );
        assert_eq!(
            pbx.getvar("PRESENCE_STATE(CustomPresence:alice,subtype)"),
            "meeting, room 4"
        );
        assert_eq!(
            pbx.getvar("PRESENCE_STATE(CustomPresence:alice,message,e)"),
            "aW4gYSBtZWV0aW5nLCBzb3JyeQ=="
        );
        assert_eq!(pbx.getvar("PRESENCE_STATE(CustomPresence:alice)"), "");
        // Same presence again: PresenceStateChange but no PresenceStatus.
        let ev = pbx
            .setvar(
                "PRESENCE_STATE(CustomPresence:alice)",
                "dnd,bWVldGluZywgcm9vbSA0,aW4gYSBtZWV0aW5nLCBzb3JyeQ==,e",
            )
            .expect("set");
        assert_eq!(names(&ev), ["PresenceStateChange:dnd"]);
        assert_eq!(
            pbx.setvar("PRESENCE_STATE(CustomPresence:alice)", "sleepy"),
            Err(SetvarError::InvalidPresence)
        );
        assert_eq!(
            pbx.setvar("PRESENCE_STATE(CustomPresence:alice)", "away,a,b,x"),
            Err(SetvarError::InvalidPresence)
        );
        assert_eq!(
            pbx.setvar("PRESENCE_STATE(Other:alice)", "away"),
            Err(SetvarError::NotCustomPresence)
        );
    }

    #[test]
    fn restart_renames_custom_devices_with_a_slash() {
        let mut pbx = fixture_pbx();
        pbx.setvar("DEVICE_STATE(Custom:dnd300)", "NOT_INUSE")
            .expect("set");
        pbx.setvar("DEVICE_STATE(Custom:Local/100@phones)", "RINGING")
            .expect("set");
        pbx.setvar("PRESENCE_STATE(CustomPresence:alice)", "away")
            .expect("set");
        pbx.setvar("FOO", "bar").expect("global");
        pbx.restart();
        let list: Vec<(String, &str)> = pbx
            .device_list()
            .into_iter()
            .map(|(d, s)| (d, s.as_str()))
            .collect();
        assert_eq!(
            list,
            [
                ("Custom:100@phones".to_owned(), "RINGING"),
                ("Custom:dnd300".to_owned(), "NOT_INUSE")
            ]
        );
        // Not cached any more, and "Custom:Local" is no channel technology.
        assert_eq!(
            pbx.getvar("DEVICE_STATE(Custom:Local/100@phones)"),
            "INVALID"
        );
        assert!(pbx.presence_list().is_empty());
        assert_eq!(
            pbx.getvar("PRESENCE_STATE(CustomPresence:alice,value)"),
            "away"
        );
        assert_eq!(pbx.getvar("FOO"), "");
    }

    #[test]
    fn setvar_through_the_astdb_slot_updates_the_cache_entry_of_the_device() {
        use DeviceState::*;
        // Keys differing in case share one cache entry but not one astdb entry; a restart
        // clears the slots and brings keys with a '/' back under another name.
        let keys = ["a", "A", "x/a", "X/A", "b", "Local/B", "b/b"];
        let prefixes = ["Custom:", "custom:", "CUSTOM:"];
        let opts = PbxOptions {
            system_name: None,
            phone_duplicates: true,
        };
        let mut pbx = Pbx::new(Vec::new(), Vec::new(), opts);
        // The model: astdb by key, the cache's states by lower-cased device.
        let mut db: BTreeMap<String, DeviceState> = BTreeMap::new();
        let mut cache: HashMap<String, DeviceState> = HashMap::new();
        let mut seed = 7u64;
        for _ in 0..3000 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = (seed >> 33) as usize;
            if r.is_multiple_of(40) {
                pbx.restart();
                // In key order: the last key of a renamed device gives its state.
                cache = db
                    .iter()
                    .map(|(k, s)| {
                        let name = k.rsplit('/').next().unwrap_or(k);
                        (format!("custom:{name}").to_ascii_lowercase(), *s)
                    })
                    .collect();
                continue;
            }
            let key = keys[r % keys.len()];
            let prefix = prefixes[(r / 7) % prefixes.len()];
            let state = [NotInuse, Inuse, Busy][(r / 21) % 3];
            let evs = pbx
                .setvar(&format!("DEVICE_STATE({prefix}{key})"), state.as_str())
                .expect("valid Setvar");
            db.insert(key.to_owned(), state);
            let device = format!("Custom:{key}");
            let changed = cache.insert(device.to_ascii_lowercase(), state) != Some(state);
            if changed {
                assert_eq!(evs.len(), 1);
                assert_eq!(evs[0].message().get("Device"), Some(device.as_str()));
                assert_eq!(evs[0].message().get("State"), Some(state.as_str()));
            } else {
                assert!(evs.is_empty(), "{evs:?}");
            }
            assert_eq!(pbx.device_state(&device), state);
            let list = pbx.device_list();
            assert_eq!(list.len(), cache.len());
            for (d, s) in list {
                assert_eq!(cache.get(&d.to_ascii_lowercase()), Some(&s), "{d}");
            }
        }
    }

    #[test]
    fn phones_are_cached_and_duplicated() {
        let mut pbx = fixture_pbx();
        let ev = pbx
            .set_device_state("PJSIP/1000", DeviceState::Ringing)
            .expect("set");
        assert_eq!(
            names(&ev),
            ["DeviceStateChange:RINGING", "DeviceStateChange:RINGING"]
        );
        assert!(
            pbx.set_device_state("PJSIP/1000", DeviceState::Ringing)
                .expect("set")
                .is_empty()
        );
        assert_eq!(pbx.device_list().len(), 1);
        assert_eq!(
            pbx.set_device_state("Custom:x", DeviceState::Unknown),
            Err(SetvarError::InvalidState)
        );
    }

    #[test]
    fn base64_is_lenient() {
        assert_eq!(base64_lenient("aGk="), "hi");
        assert_eq!(base64_lenient("aGk"), "hi");
        assert_eq!(base64_lenient("aGk!!"), "hi");
        assert_eq!(base64_lenient(""), "");
    }
}
