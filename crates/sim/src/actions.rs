//! The AMI actions the simulator answers, with the texts, header sets and header order of real
//! Asterisk (`main/manager.c`) as the captures show them, plus the simulator-only `Sim*`
//! admin actions (see the crate README).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use compact_str::CompactString;
use hintfed_ami::Message;
use md5::{Digest, Md5};

use crate::event::{self, SimEvent};
use crate::server::{Shared, now_epoch};
use crate::session::{Outcome, SessionCtx};
use crate::state::{DeviceState, extension_state_text};

/// One action the simulator knows: canonical spelling (Asterisk matches names ignoring
/// case), the `EVENT_FLAG_*` authority it is registered with in Asterisk (the user's `write`
/// permissions must share a bit with it; 0: anyone logged in) and its `ListCommands`
/// synopsis.
struct ActionDef {
    name: &'static str,
    authority: u32,
    synopsis: &'static str,
}

const fn def(name: &'static str, authority: u32, synopsis: &'static str) -> ActionDef {
    ActionDef {
        name,
        authority,
        synopsis,
    }
}

const CALL_REPORTING: u32 = event::CALL | event::REPORTING;

/// Every action, in `ListCommands` order. The `Sim*` admin actions need no permission: they
/// drive the simulator, not the Asterisk it plays.
const ACTIONS: &[ActionDef] = &[
    def("Challenge", 0, "Generate Challenge for MD5 Auth."),
    def("Command", event::COMMAND, "Execute Asterisk CLI Command."),
    def(
        "CoreStatus",
        event::SYSTEM | event::REPORTING,
        "Show PBX core status variables.",
    ),
    def(
        "DeviceStateList",
        CALL_REPORTING,
        "List the current known device states.",
    ),
    def("Events", 0, "Control Event Flow."),
    def("ExtensionState", CALL_REPORTING, "Check Extension Status."),
    def(
        "ExtensionStateList",
        CALL_REPORTING,
        "List the current known extension states.",
    ),
    def(
        "Filter",
        event::SYSTEM,
        "Dynamically add filters for the current manager session.",
    ),
    def(
        "Getvar",
        CALL_REPORTING,
        "Gets a channel variable or function value.",
    ),
    def("ListCommands", 0, "List available manager commands."),
    def("Login", 0, "Login Manager."),
    def("Logoff", 0, "Logoff Manager."),
    def("Originate", event::ORIGINATE, "Originate a call."),
    def("Ping", 0, "Keepalive command."),
    def(
        "PresenceStateList",
        CALL_REPORTING,
        "List the current known presence states.",
    ),
    def(
        "Setvar",
        event::CALL,
        "Sets a channel variable or function value.",
    ),
    def(
        "SimBlackhole",
        0,
        "hintfed-sim: stop answering (Seconds, Scope).",
    ),
    def(
        "SimRestart",
        0,
        "hintfed-sim: simulate an Asterisk restart (DownSeconds).",
    ),
    def(
        "SimSetDeviceState",
        0,
        "hintfed-sim: set any device state (Device, State).",
    ),
    def("SimStats", 0, "hintfed-sim: simulator counters."),
];

/// One counter per action of [`ACTIONS`], in its order (see [`Shared::action_counts`]).
pub(crate) fn action_counters() -> Box<[AtomicU64]> {
    ACTIONS.iter().map(|_| AtomicU64::new(0)).collect()
}

/// `counts` (from [`action_counters`]) added to `actions` under the actions' canonical
/// names (those run at least once).
pub(crate) fn add_action_counts(
    actions: &mut std::collections::BTreeMap<String, u64>,
    counts: &[AtomicU64],
) {
    for (a, n) in ACTIONS.iter().zip(counts) {
        let n = n.load(Ordering::Relaxed);
        if n > 0 {
            *actions.entry(a.name.to_owned()).or_default() += n;
        }
    }
}

/// `Response: <kind>` plus `ActionID` when the request had a non-empty one.
fn response(kind: &str, req: &Message) -> Message {
    response_to(kind, req.action_id())
}

/// [`response`] to a request whose `ActionID` is `id`.
fn response_to(kind: &str, id: Option<&str>) -> Message {
    let id = id.filter(|id| !id.is_empty());
    // Room for the usual answer (a `Message:` line) without growing.
    let mut m = Message::with_capacity(64 + id.map_or(0, str::len), 4);
    m.push("Response", kind);
    if let Some(id) = id {
        m.push("ActionID", id);
    }
    m
}

/// `astman_send_ack`.
fn ack(req: &Message, msg: &str) -> Message {
    let id = req.action_id().filter(|id| !id.is_empty());
    let mut m = Message::with_capacity(64 + id.map_or(0, str::len), 3);
    for (k, v) in ack_headers(id, msg) {
        m.push(k, v);
    }
    m
}

/// [`ack`] to a request whose `ActionID` is `id`, as the session writes it without making the
/// message (see [`Replies::Ack`](crate::session::Replies)): the id kept inline when short.
fn ack_reply(id: Option<&str>, message: &'static str) -> Outcome {
    Outcome::ack(
        id.filter(|id| !id.is_empty()).map(CompactString::new),
        message,
    )
}

/// The headers of [`ack`]'s answer, in order (`id` given and not empty).
pub(crate) fn ack_headers<'a>(
    id: Option<&'a str>,
    message: &'a str,
) -> impl Iterator<Item = (&'a str, &'a str)> + Clone {
    std::iter::once(("Response", "Success"))
        .chain(id.map(|id| ("ActionID", id)))
        .chain(std::iter::once(("Message", message)))
}

/// `astman_send_error`.
fn error(req: &Message, msg: &str) -> Message {
    response("Error", req).with("Message", msg)
}

fn header<'a>(req: &'a Message, key: &str) -> &'a str {
    req.get(key).unwrap_or("")
}

/// What [`Message::get`] finds for each of `keys` (distinct), in one pass over the headers.
fn headers<'a, const N: usize>(req: &'a Message, keys: [&str; N]) -> [Option<&'a str>; N] {
    let mut found = [None; N];
    for (k, v) in req.headers() {
        for (key, slot) in keys.iter().zip(&mut found) {
            if slot.is_none() && k.eq_ignore_ascii_case(key) {
                *slot = Some(v);
            }
        }
    }
    found
}

/// Whether `req` may pass a blackhole: `SimBlackhole` with `Seconds: 0` ends it.
pub(crate) fn ends_blackhole(req: &Message) -> bool {
    req.action_name()
        .is_some_and(|a| a.eq_ignore_ascii_case("SimBlackhole"))
        && header(req, "Seconds").trim() == "0"
}

/// Answers one action.
pub(crate) async fn handle(shared: &Arc<Shared>, ctx: &mut SessionCtx, req: &Message) -> Outcome {
    let Some(action) = req.action_name().map(str::trim).filter(|a| !a.is_empty()) else {
        return Outcome::reply(error(req, "Missing action in request"));
    };
    let index = ACTIONS
        .iter()
        .position(|a| a.name.eq_ignore_ascii_case(action));
    let known = index.and_then(|i| ACTIONS.get(i));
    match index.and_then(|i| shared.action_counts.get(i)) {
        // A known action is counted without the server lock.
        Some(n) => {
            n.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            let mut inner = shared.lock();
            match inner.stats.actions.get_mut(action) {
                Some(n) => *n += 1,
                None => {
                    inner.stats.actions.insert(action.to_owned(), 1);
                }
            }
        }
    }
    let name = known.map_or("", |a| a.name);
    if !ctx.authenticated && !matches!(name, "Login" | "Logoff" | "Challenge") {
        return Outcome::reply(error(req, "Permission denied"));
    }
    // `process_message`: any shared bit is enough.
    if let Some(a) = known
        && a.authority != 0
        && shared.cfg.write & a.authority == 0
    {
        return Outcome::reply(error(req, "Permission denied"));
    }
    match name {
        "Login" => login(shared, ctx, req).await,
        "Challenge" => challenge(ctx, req),
        "Logoff" => {
            Outcome::reply(response("Goodbye", req).with("Message", "Thanks for all the fish."))
                .closing()
        }
        "Ping" => {
            let (s, us) = now_epoch();
            Outcome::reply(
                response("Success", req)
                    .with("Ping", "Pong")
                    .with("Timestamp", format!("{s}.{us:06}")),
            )
        }
        "Events" => events(ctx, req),
        "Filter" => filter(ctx, req),
        "Setvar" => setvar(shared, req),
        "Getvar" => getvar(shared, req),
        "DeviceStateList" => device_state_list(shared, req),
        "PresenceStateList" => presence_state_list(shared, req),
        "ExtensionStateList" => extension_state_list(shared, req),
        "ExtensionState" => extension_state(shared, req),
        "Command" => command(shared, req),
        "Originate" => originate(shared, req),
        "ListCommands" => list_commands(shared, req),
        "CoreStatus" => core_status(shared, req),
        "SimSetDeviceState" => sim_set_device_state(shared, req),
        "SimRestart" => sim_restart(shared, req),
        "SimStats" => sim_stats(shared, req),
        "SimBlackhole" => sim_blackhole(shared, ctx, req),
        _ => Outcome::reply(error(
            req,
            &format!(
                "Invalid/unknown command: {action}. Use Action: ListCommands to show available commands."
            ),
        )),
    }
}

fn challenge(ctx: &mut SessionCtx, req: &Message) -> Outcome {
    if !header(req, "AuthType").eq_ignore_ascii_case("MD5") {
        return Outcome::reply(error(req, "Must specify AuthType"));
    }
    let c = ctx
        .challenge
        .get_or_insert_with(|| (rand::random::<u32>() >> 1).to_string())
        .clone();
    Outcome::reply(response("Success", req).with("Challenge", c))
}

async fn login(shared: &Arc<Shared>, ctx: &mut SessionCtx, req: &Message) -> Outcome {
    if ctx.authenticated {
        return Outcome::reply(ack(req, "Already authenticated"));
    }
    let cfg = &shared.cfg;
    let user_ok = header(req, "Username").eq_ignore_ascii_case(&cfg.username);
    let key = header(req, "Key");
    let md5 = header(req, "AuthType").eq_ignore_ascii_case("MD5")
        && !key.is_empty()
        && ctx.challenge.is_some();
    let secret_ok = if md5 {
        let mut h = Md5::new();
        h.update(ctx.challenge.as_deref().unwrap_or("").as_bytes());
        h.update(cfg.secret.as_bytes());
        hex::encode(h.finalize()).eq_ignore_ascii_case(key)
    } else {
        header(req, "Secret") == cfg.secret
    };
    if !(user_ok && secret_ok) {
        shared.lock().stats.logins_failed += 1;
        tracing::info!(peer = %ctx.peer, "login refused");
        tokio::time::sleep(cfg.auth_failure_delay).await;
        return Outcome::reply(error(req, "Authentication failed")).closing();
    }
    ctx.authenticated = true;
    for f in &cfg.event_filters {
        // Checked by the command line; a bad one from elsewhere is skipped, as Asterisk
        // skips an eventfilter line that does not compile.
        if let Err(e) = ctx.filters.add(f) {
            tracing::warn!(filter = %f, error = %e, "eventfilter does not compile; ignored");
        }
    }
    if let Some(mask) = req.get("Events").and_then(event::parse_mask) {
        ctx.mask = mask;
    }
    let mut replies = vec![ack(req, "Authentication accepted")];
    let mut inner = shared.lock();
    ctx.sub = Some(shared.subscribe(&mut inner, ctx.mask, ctx.filters.clone(), ctx.ready.clone()));
    inner.stats.logins_accepted += 1;
    if ctx.mask & event::SYSTEM != 0 {
        let up = shared.uptime(&inner).to_string();
        replies.push(
            Message::new()
                .with("Event", "FullyBooted")
                .with("Privilege", event::privilege(event::SYSTEM))
                .with("Uptime", up.clone())
                .with("LastReload", up)
                .with("Status", "Fully Booted"),
        );
    }
    let tv = format_tv(SystemTime::now());
    let ev = SimEvent::new(
        "SuccessfulAuth",
        event::SECURITY,
        inner.pbx.system_name(),
        Message::new()
            .with("EventTV", tv.clone())
            .with("Severity", "Informational")
            .with("Service", "AMI")
            .with("EventVersion", "1")
            .with("AccountID", cfg.username.clone())
            .with("SessionID", format!("0x7f{:010x}", ctx.id * 0xee0))
            .with("LocalAddress", ami_addr(ctx.local))
            .with("RemoteAddress", ami_addr(ctx.peer))
            .with("UsingPassword", "0")
            .with("SessionTV", tv),
    );
    shared.emit(&mut inner, vec![ev]);
    shared.logged_in.send_replace(true);
    Outcome::many(replies)
}

/// `IPV4/TCP/127.0.0.1/15038`, as security events print addresses.
fn ami_addr(a: std::net::SocketAddr) -> String {
    let v = if a.is_ipv4() { "IPV4" } else { "IPV6" };
    format!("{v}/TCP/{}/{}", a.ip(), a.port())
}

fn events(ctx: &mut SessionCtx, req: &Message) -> Outcome {
    match event::parse_mask(header(req, "EventMask")) {
        None => Outcome::reply(error(req, "Invalid event mask")),
        Some(mask) => {
            ctx.mask = mask;
            if let Some(sub) = &ctx.sub {
                sub.lock().mask = mask;
            }
            let v = if mask == 0 { "Off" } else { "On" };
            Outcome::reply(response("Success", req).with("Events", v))
        }
    }
}

fn setvar(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let [var, channel, value, id] = headers(req, ["Variable", "Channel", "Value", "ActionID"]);
    let (var, value) = (var.unwrap_or(""), value.unwrap_or(""));
    let mut inner = shared.lock();
    inner.stats.setvar_total += 1;
    let reply = if var.is_empty() {
        error(req, "No variable specified")
    } else if !channel.unwrap_or("").is_empty() {
        error(req, "No such channel")
    } else {
        match inner.pbx.setvar_events(var, value) {
            Ok(evs) => {
                inner.stats.setvar_accepted += 1;
                crate::trace::record(shared.cfg.name.as_deref(), "set", var, value);
                shared.emit(&mut inner, evs);
                return ack_reply(id, "Variable Set");
            }
            Err(e) => {
                tracing::debug!(variable = %var, error = %e, "Setvar refused");
                error(req, "Variable not set")
            }
        }
    };
    inner.stats.setvar_refused += 1;
    Outcome::reply(reply)
}

fn getvar(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let var = header(req, "Variable");
    if var.is_empty() {
        return Outcome::reply(error(req, "No variable specified"));
    }
    if !header(req, "Channel").is_empty() {
        return Outcome::reply(error(req, "No such channel"));
    }
    let value = shared.lock().pbx.getvar(var);
    Outcome::reply(
        response("Success", req)
            .with("Variable", var)
            .with("Value", value),
    )
}

/// `astman_send_listack` + items + `astman_send_list_complete`.
fn list(req: &Message, what: &str, complete: &str, items: Vec<Message>) -> Outcome {
    let mut out = vec![
        response("Success", req)
            .with("EventList", "start")
            .with("Message", what),
    ];
    let n = items.len();
    out.extend(items);
    let mut done = Message::new().with("Event", complete);
    if let Some(id) = req.action_id().filter(|id| !id.is_empty()) {
        done.push("ActionID", id);
    }
    out.push(
        done.with("EventList", "Complete")
            .with("ListItems", n.to_string()),
    );
    Outcome::many(out)
}

fn list_item(req: &Message, event: &str) -> Message {
    let mut m = Message::new().with("Event", event);
    if let Some(id) = req.action_id().filter(|id| !id.is_empty()) {
        m.push("ActionID", id);
    }
    m
}

fn device_state_list(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let items = shared
        .lock()
        .pbx
        .device_list()
        .into_iter()
        .map(|(d, s)| {
            list_item(req, "DeviceStateChange")
                .with("Device", d)
                .with("State", s.as_str())
        })
        .collect();
    list(
        req,
        "Device State Changes will follow",
        "DeviceStateListComplete",
        items,
    )
}

fn presence_state_list(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let items = shared
        .lock()
        .pbx
        .presence_list()
        .into_iter()
        .map(|(p, s)| {
            list_item(req, "PresenceStateChange")
                .with("Presentity", p)
                .with("Status", s.state.as_str())
                .with("Subtype", s.subtype)
                .with("Message", s.message)
        })
        .collect();
    list(
        req,
        "Presence State Changes will follow",
        "PresenceStateListComplete",
        items,
    )
}

fn extension_state_list(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let items = shared
        .lock()
        .pbx
        .hints()
        .iter()
        .map(|h| {
            list_item(req, "ExtensionStatus")
                .with("Exten", h.hint.exten.clone())
                .with("Context", h.hint.context.clone())
                .with("Hint", h.hint.app.clone())
                .with("Status", h.last_state.to_string())
                .with("StatusText", extension_state_text(h.last_state))
        })
        .collect();
    list(
        req,
        "Extension Statuses will follow",
        "ExtensionStateListComplete",
        items,
    )
}

fn extension_state(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let exten = header(req, "Exten");
    let context = Some(header(req, "Context"))
        .filter(|c| !c.is_empty())
        .unwrap_or("default");
    let inner = shared.lock();
    let mut m = response("Success", req)
        .with("Message", "Extension Status")
        .with("Exten", exten)
        .with("Context", context);
    match inner.pbx.extension_state(exten, context) {
        Some((hint, state, presence)) => {
            m = m
                .with("Hint", hint.app.clone())
                .with("Status", state.to_string())
                .with("StatusText", extension_state_text(state));
            if hint.presence.is_some() {
                m.push("PresenceState", presence.state.as_str());
                if !presence.subtype.is_empty() {
                    m.push("PresenceSubtype", presence.subtype);
                }
                if !presence.message.is_empty() {
                    m.push("PresenceMessage", presence.message);
                }
            }
        }
        None => {
            m = m
                .with("Hint", "")
                .with("Status", "-1")
                .with("StatusText", extension_state_text(-1));
        }
    }
    Outcome::reply(m)
}

/// Asterisk's `ast_cli` uptime printing: `1 hour, 2 minutes, 3 seconds`.
fn print_uptime(secs: u64) -> String {
    let units = [
        (31_536_000, "year"),
        (604_800, "week"),
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
    ];
    let mut rest = secs;
    let mut parts = Vec::new();
    for (n, name) in units {
        let q = rest / n;
        if q > 0 {
            parts.push(format!("{q} {name}{}", if q == 1 { "" } else { "s" }));
            rest %= n;
        }
    }
    if rest > 0 || parts.is_empty() {
        parts.push(format!("{rest} second{}", if rest == 1 { "" } else { "s" }));
    }
    parts.join(", ")
}

fn command(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let cmd = header(req, "Command")
        .split_whitespace()
        .collect::<Vec<_>>();
    let cmd = cmd.join(" ");
    let inner = shared.lock();
    let lines: Option<Vec<String>> = match cmd.to_ascii_lowercase().as_str() {
        "core show hints" => {
            let mut l = vec![
                String::new(),
                "    -= Registered Asterisk Dial Plan Hints =-".to_owned(),
            ];
            for h in inner.pbx.hints() {
                let presence = h.last_presence.state.as_str();
                l.push(format!(
                    "{:<30.30}: {:<60.60}  State:{:<15.15} Presence:{:<15.15} Watchers {:>2}",
                    format!("{}@{}", h.hint.exten, h.hint.context),
                    h.hint.app,
                    extension_state_text(h.last_state),
                    presence,
                    1
                ));
            }
            l.push("----------------".to_owned());
            l.push(format!("- {} hints registered", inner.pbx.hints().len()));
            Some(l)
        }
        "core show uptime" => {
            let up = print_uptime(shared.uptime(&inner));
            Some(vec![
                format!("System uptime: {up}"),
                format!("Last reload: {up}"),
            ])
        }
        "core show uptime seconds" => {
            let up = shared.uptime(&inner);
            Some(vec![
                format!("System uptime: {up}"),
                format!("Last reload: {up}"),
            ])
        }
        "core show version" => Some(vec![
            "Asterisk hintfed-sim (simulated, AMI 13.0.0)".to_owned(),
        ]),
        _ => None,
    };
    let m = match lines {
        Some(lines) => {
            let mut m = response("Success", req).with("Message", "Command output follows");
            for l in lines {
                m.push("Output", l);
            }
            m
        }
        None => response("Error", req)
            .with("Message", "Command output follows")
            .with(
                "Output",
                format!(
                    "No such command '{cmd}' (type 'core show help {cmd}' for other possible commands)"
                ),
            ),
    };
    Outcome::reply(m)
}

/// How long a simulated call lasts: `Data` of `Application: Wait`, a `WAITSECS` variable
/// (what the fixture dialplan waits), the smaller of both; 3 s (the fixture dialplan's
/// default) when neither is given.
fn call_duration(req: &Message) -> Duration {
    let mut secs: Option<f64> = None;
    let mut take = |v: &str| {
        if let Ok(s) = v.trim().parse::<f64>()
            && s.is_finite()
            && s >= 0.0
        {
            secs = Some(secs.map_or(s, |x: f64| x.min(s)));
        }
    };
    if header(req, "Application").eq_ignore_ascii_case("Wait") {
        take(header(req, "Data"));
    }
    for v in req.get_all("Variable") {
        for kv in v.split(',') {
            if let Some((k, val)) = kv.split_once('=')
                && k.trim().eq_ignore_ascii_case("WAITSECS")
            {
                take(val);
            }
        }
    }
    Duration::from_secs_f64(secs.unwrap_or(3.0).min(86_400.0))
}

fn originate(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let channel = header(req, "Channel").trim();
    if channel.is_empty() {
        return Outcome::reply(error(req, "Channel not specified"));
    }
    let Some((tech, _)) = channel.split_once('/') else {
        return Outcome::reply(error(req, "Invalid channel"));
    };
    let device = channel.to_owned();
    let duration = call_duration(req);
    let generation = *shared.generation.borrow();
    let reply = ack(req, "Originate successfully queued");

    let mut inner = shared.lock();
    let (n, uid) = inner.pbx.next_channel();
    let chan_name = if tech.eq_ignore_ascii_case("Local") {
        format!("{device}-{n:08x};1")
    } else {
        format!("{device}-{n:08x}")
    };
    let (secs, _) = now_epoch();
    let uniqueid = match inner.pbx.system_name() {
        Some(s) => format!("{s}-{secs}.{uid}"),
        None => format!("{secs}.{uid}"),
    };
    let mut evs = inner.pbx.call_start(&device);
    let mut body = Message::new();
    if let Some(id) = req.action_id().filter(|id| !id.is_empty()) {
        body.push("ActionID", id);
    }
    body.push("Response", "Success");
    body.push("Channel", chan_name);
    let app = header(req, "Application");
    if app.is_empty() {
        body.push("Context", header(req, "Context"));
        body.push("Exten", header(req, "Exten"));
    } else {
        body.push("Application", app);
        body.push("Data", header(req, "Data"));
    }
    body.push("Reason", "4");
    body.push("Uniqueid", uniqueid);
    body.push("CallerIDNum", "<unknown>");
    body.push("CallerIDName", "<unknown>");
    evs.push(SimEvent::new(
        "OriginateResponse",
        event::CALL,
        inner.pbx.system_name(),
        body,
    ));
    shared.emit(&mut inner, evs);
    drop(inner);

    let shared2 = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shared2.shutdown.cancelled() => {}
            () = tokio::time::sleep(duration) => {
                let mut inner = shared2.lock();
                // A restart in between already ended the call.
                if *shared2.generation.borrow() == generation {
                    let evs = inner.pbx.call_end(&device);
                    shared2.emit(&mut inner, evs);
                }
            }
        }
    });
    Outcome::reply(reply)
}

/// `CoreStatus`: start-up and reload date/time (UTC) and calls in progress. A restart changes
/// the start-up time, which is how a client can tell.
fn core_status(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let inner = shared.lock();
    let tv = format_tv(inner.boot_wall);
    let (date, time) = (&tv[..10], &tv[11..19]);
    Outcome::reply(
        response("Success", req)
            .with("CoreStartupDate", date)
            .with("CoreStartupTime", time)
            .with("CoreReloadDate", date)
            .with("CoreReloadTime", time)
            .with("CoreCurrentCalls", inner.pbx.active_calls().to_string()),
    )
}

/// `ListCommands`: `<Action>: <Synopsis> (Priv: <classes>)` per action the user may run.
fn list_commands(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let mut m = response("Success", req);
    for a in ACTIONS {
        if a.authority == 0 || shared.cfg.write & a.authority != 0 {
            let privs = event::privilege(a.authority);
            m.push(a.name, format!("{} (Priv: {privs})", a.synopsis));
        }
    }
    Outcome::reply(m)
}

/// `Filter` (`action_filter`): `Operation: Add` and a filter for this session's events.
fn filter(ctx: &mut SessionCtx, req: &Message) -> Outcome {
    if !header(req, "Operation").eq_ignore_ascii_case("Add") {
        return Outcome::reply(error(req, "Unknown operation"));
    }
    match ctx.filters.add(header(req, "Filter")) {
        Ok(()) => {
            if let Some(sub) = &ctx.sub {
                sub.lock().filters = ctx.filters.clone();
            }
            Outcome::reply(ack(req, "Success"))
        }
        Err(crate::filter::FilterError::Regex(_)) => Outcome::reply(error(
            req,
            "Filter did not compile.  Check the syntax of the filter given.",
        )),
        // Asterisk's answer when a filter cannot be added for any other reason.
        Err(crate::filter::FilterError::TooMany) => {
            Outcome::reply(error(req, "Internal Error. Failed adding filter."))
        }
    }
}

fn sim_set_device_state(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let [device, state, id] = headers(req, ["Device", "State", "ActionID"]);
    let device = device.unwrap_or("").trim();
    if device.is_empty() {
        return Outcome::reply(error(req, "Device not specified"));
    }
    let Some(state) = DeviceState::parse(state.unwrap_or("")) else {
        return Outcome::reply(error(req, "Invalid State"));
    };
    match shared.set_device_state(device, state) {
        Ok(()) => ack_reply(id, "Device state set"),
        Err(e) => Outcome::reply(error(req, &format!("Device state not set: {e}"))),
    }
}

fn sim_restart(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let down = header(req, "DownSeconds")
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(0.0);
    // The session answers first, then sees the new generation and closes.
    shared.restart(Duration::from_secs_f64(down.min(86_400.0)));
    Outcome::reply(ack(req, "Restarting"))
}

fn sim_stats(shared: &Arc<Shared>, req: &Message) -> Outcome {
    let inner = shared.lock();
    let s = &shared.stats(&inner);
    let mut m = ack(req, "Simulator statistics")
        .with("Uptime", shared.uptime(&inner).to_string())
        .with("Connections", s.connections.to_string())
        .with("ConnectionsTotal", s.connections_total.to_string())
        .with("LoginsAccepted", s.logins_accepted.to_string())
        .with("LoginsFailed", s.logins_failed.to_string())
        .with("SetvarTotal", s.setvar_total.to_string())
        .with("SetvarAccepted", s.setvar_accepted.to_string())
        .with("SetvarRefused", s.setvar_refused.to_string())
        .with("Events", s.events.to_string())
        .with("SlowReadersDropped", s.slow_readers_dropped.to_string())
        .with("BlackholedActions", s.blackholed_actions.to_string())
        .with("Restarts", s.restarts.to_string());
    for (name, n) in &s.actions {
        m.push(format!("Action-{name}"), n.to_string());
    }
    Outcome::reply(m)
}

fn sim_blackhole(shared: &Arc<Shared>, ctx: &mut SessionCtx, req: &Message) -> Outcome {
    let secs = header(req, "Seconds").trim();
    let until = if secs.is_empty() {
        Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400))
    } else {
        match secs.parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(s.min(1e9)))
            }
            Ok(0.0) => None,
            _ => return Outcome::reply(error(req, "Invalid Seconds")),
        }
    };
    let scope = header(req, "Scope");
    let msg = if until.is_some() {
        "Blackhole on"
    } else {
        "Blackhole off"
    };
    if scope.eq_ignore_ascii_case("connection") {
        ctx.blackhole_until = until;
    } else if scope.is_empty() || scope.eq_ignore_ascii_case("server") {
        shared.set_blackhole(&mut shared.lock(), until);
        ctx.blackhole_until = None;
    } else {
        return Outcome::reply(error(req, "Invalid Scope"));
    }
    Outcome::reply(ack(req, msg))
}

/// `2026-11-23T05:47:06.410+0000` (UTC), as security events print times.
pub(crate) fn format_tv(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tv_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_412_826_410);
        assert_eq!(format_tv(t), "2026-11-23T05:47:06.410+0000");
        assert_eq!(
            format_tv(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000+0000"
        );
    }

    #[test]
    fn uptime_text() {
        assert_eq!(print_uptime(0), "0 seconds");
        assert_eq!(print_uptime(21), "21 seconds");
        assert_eq!(print_uptime(3661), "1 hour, 1 minute, 1 second");
    }

    #[test]
    fn durations() {
        let req = Message::action("Originate")
            .with("Application", "Wait")
            .with("Data", "2")
            .with("Variable", "WAITSECS=5");
        assert_eq!(call_duration(&req), Duration::from_secs(2));
        let req = Message::action("Originate").with("Variable", "A=1,WAITSECS=0.5");
        assert_eq!(call_duration(&req), Duration::from_millis(500));
        assert_eq!(
            call_duration(&Message::action("Originate")),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn responses_carry_action_id_only_when_given() {
        let req = Message::action("Ping");
        assert_eq!(ack(&req, "x").get("ActionID"), None);
        let req = req.with("ActionID", "a1");
        let m = error(&req, "x");
        let keys: Vec<&str> = m.headers().map(|(k, _)| k).collect();
        assert_eq!(keys, ["Response", "ActionID", "Message"]);
    }

    #[test]
    fn headers_in_one_pass_find_what_get_finds() {
        let req = Message::action("Setvar")
            .with("value", "INUSE")
            .with("Variable", "DEVICE_STATE(Custom:a)")
            .with("VALUE", "BUSY")
            .with("actionid", "")
            .with("ActionID", "a1");
        let keys = ["Variable", "Channel", "Value", "ActionID", "Action"];
        assert_eq!(headers(&req, keys), keys.map(|k| req.get(k)));
        assert_eq!(headers(&Message::new(), keys), [None; 5]);
    }
}
