//! The connection-state and hook contract, one test per property P29–P40 of the MAPI digest
//! §6, against the engine API. The server's tests check the same properties over HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use herald_core::hooks::{
    After, Before, ConnectionHook, Context, HookError, HookFuture, HookRequest, Hooks, Operation,
    Status,
};
use herald_core::offline::{self, AdviseError, AdviseInfo, OfflineState, SetStateError};
use herald_core::{
    ConnectionStateChange, STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE, StateChangePhase,
};

type Seen = Arc<Mutex<Vec<ConnectionStateChange>>>;

fn recorder() -> (
    Seen,
    impl Fn(&ConnectionStateChange) + Send + Sync + 'static,
) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (seen, move |n: &ConnectionStateChange| {
        s.lock().unwrap().push(n.clone())
    })
}

/// Changes the state and waits for the transition to end.
fn switch(state: &OfflineState, to: u32) {
    state
        .set_current_state(offline::FLAG_BLOCK, STATE_OFFLINE_MASK, to)
        .unwrap();
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn p29_advise_without_a_notify_callback_is_e_nointerface_and_bad_fields_e_invalidarg() {
    let state = OfflineState::new(STATE_ONLINE);
    let (_, sink) = recorder();
    let good = AdviseInfo::notify(1, sink);

    let mut wrong_type = good.clone();
    wrong_type.callback_type = 1;
    let e = state.advise(0, wrong_type).unwrap_err();
    assert_eq!(e, AdviseError::NoInterface);
    assert_eq!(e.hresult(), 0x8000_4002);

    let mut no_callback = good.clone();
    no_callback.callback = None;
    assert_eq!(
        state.advise(0, no_callback).unwrap_err(),
        AdviseError::NoInterface
    );

    let mut bad_types = good.clone();
    bad_types.advise_types = 2;
    let e = state.advise(0, bad_types).unwrap_err();
    assert_eq!(e.hresult(), 0x8007_0057);

    for mask in [0x4000_0000, 0x1, 0x2, 0x0] {
        let mut bad_mask = good.clone();
        bad_mask.state_mask = mask;
        assert!(
            matches!(state.advise(0, bad_mask), Err(AdviseError::InvalidArg(_))),
            "{mask:#x}"
        );
    }
    assert!(matches!(
        state.advise(1, good.clone()),
        Err(AdviseError::InvalidArg(_))
    ));

    assert_eq!(state.advised(), 0, "nothing refused was registered");
    let t1 = state.advise(0, good.clone()).unwrap();
    let t2 = state.advise(0, good).unwrap();
    assert!(t1 != 0 && t2 != 0 && t1 != t2);
}

#[test]
fn p30_every_notification_echoes_the_client_token_given_at_advise() {
    let state = OfflineState::new(STATE_ONLINE);
    let (a, sink_a) = recorder();
    let (b, sink_b) = recorder();
    state.advise(0, AdviseInfo::notify(41, sink_a)).unwrap();
    state.advise(0, AdviseInfo::notify(0, sink_b)).unwrap();
    switch(&state, STATE_OFFLINE);
    switch(&state, STATE_ONLINE);
    let a = a.lock().unwrap();
    let b = b.lock().unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    assert!(a.iter().all(|n| n.client_token == 41));
    assert!(b.iter().all(|n| n.client_token == 0));
}

#[test]
fn p31_unadvise_always_succeeds_and_releases_the_callback() {
    let state = OfflineState::new(STATE_ONLINE);
    let (seen, sink) = recorder();
    let token = state.advise(0, AdviseInfo::notify(3, sink)).unwrap();
    let probe = Arc::downgrade(&seen);
    drop(seen);
    assert!(probe.upgrade().is_some(), "the state holds the callback");
    state.unadvise(0, token);
    assert!(probe.upgrade().is_none(), "unadvise released the callback");
    // Unknown and repeated tokens succeed too.
    state.unadvise(0, token);
    state.unadvise(0, 0xdead);
    switch(&state, STATE_OFFLINE);
    assert_eq!(state.advised(), 0);

    // Unadvised in the middle of a transition: released at once, and no DONE.
    let gate = Arc::new(Barrier::new(2));
    let release = gate.clone();
    let state = OfflineState::with_transition(STATE_ONLINE, move |_, _| {
        release.wait();
    });
    let (seen, sink) = recorder();
    let token = state.advise(0, AdviseInfo::notify(3, sink)).unwrap();
    let probe = Arc::downgrade(&seen);
    state
        .set_current_state(0, STATE_OFFLINE_MASK, STATE_OFFLINE)
        .unwrap();
    while seen.lock().unwrap().len() < 2 {
        thread::sleep(Duration::from_millis(1));
    }
    let phases_before: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.phase as u32)
        .collect();
    drop(seen);
    state.unadvise(0, token);
    // The transition is held before DONE; the callback must go before that (the transition
    // thread may still be returning from the CHANGE call for a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while probe.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the transition kept the callback"
        );
        thread::sleep(Duration::from_millis(1));
    }
    gate.wait();
    while state.is_transitioning() {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(phases_before, [1, 2]);
}

#[test]
fn p32_a_transition_sends_start_then_change_then_done_with_mask_3_and_old_and_new() {
    let state = OfflineState::new(STATE_ONLINE);
    let (seen, sink) = recorder();
    state.advise(0, AdviseInfo::notify(9, sink)).unwrap();
    switch(&state, STATE_OFFLINE);
    switch(&state, STATE_ONLINE);
    let seen = seen.lock().unwrap();
    let phases: Vec<u32> = seen.iter().map(|n| n.phase as u32).collect();
    assert_eq!(phases, [1, 2, 3, 1, 2, 3]);
    assert!(seen.iter().all(|n| n.changed_mask == 0x3));
    for n in &seen[..3] {
        assert_eq!((n.old_state, n.new_state), (STATE_ONLINE, STATE_OFFLINE));
    }
    for n in &seen[3..] {
        assert_eq!((n.old_state, n.new_state), (STATE_OFFLINE, STATE_ONLINE));
    }
}

/// A consumer written as the digest says (check the type, then the mask, then read the states).
fn consume(n: &ConnectionStateChange, online: &mut Option<bool>) {
    if !matches!(n.phase as u32, 1..=3) || n.changed_mask != STATE_OFFLINE_MASK {
        return;
    }
    if n.phase == StateChangePhase::Done {
        *online = Some(n.new_state == STATE_ONLINE);
    }
}

#[test]
fn p33_a_consumer_drops_notifications_of_other_masks() {
    let mut online = None;
    let foreign = ConnectionStateChange {
        phase: StateChangePhase::Done,
        client_token: 0,
        changed_mask: 0x0000_0300,
        old_state: 0x100,
        new_state: 0x200,
    };
    consume(&foreign, &mut online);
    assert_eq!(online, None, "a change of other state bits is ignored");
    // What the engine sends always passes the filter.
    let state = OfflineState::new(STATE_ONLINE);
    let (seen, sink) = recorder();
    state.advise(0, AdviseInfo::notify(0, sink)).unwrap();
    switch(&state, STATE_OFFLINE);
    for n in seen.lock().unwrap().iter() {
        consume(n, &mut online);
    }
    assert_eq!(online, Some(false));
}

#[test]
fn p34_set_state_returns_at_once_and_is_pending_until_done_and_block_waits() {
    let gate = Arc::new(Barrier::new(2));
    let release = gate.clone();
    let state = OfflineState::with_transition(STATE_ONLINE, move |_, _| {
        release.wait();
    });
    let (seen, sink) = recorder();
    state.advise(0, AdviseInfo::notify(0, sink)).unwrap();

    state
        .set_current_state(0, STATE_OFFLINE_MASK, STATE_OFFLINE)
        .unwrap();
    // The call returned while the transition is held inside it.
    assert!(state.is_transitioning());
    let e = state
        .set_current_state(0, STATE_OFFLINE_MASK, STATE_ONLINE)
        .unwrap_err();
    assert_eq!(e, SetStateError::Pending);
    assert_eq!(e.hresult(), 0x8000_000A);
    let e = state
        .set_current_state(offline::FLAG_BLOCK, STATE_OFFLINE_MASK, STATE_ONLINE)
        .unwrap_err();
    assert_eq!(e, SetStateError::Pending, "BLOCK does not queue behind it");
    gate.wait();
    while state.is_transitioning() {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(seen.lock().unwrap().len(), 3);

    // BLOCK: DONE has been sent when the call returns.
    let (tx, rx) = mpsc::channel();
    let s2 = state.clone();
    let blocked = thread::spawn(move || {
        s2.set_current_state(offline::FLAG_BLOCK, STATE_OFFLINE_MASK, STATE_ONLINE)
            .unwrap();
        tx.send(()).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "still held"
    );
    gate.wait();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    blocked.join().unwrap();
    assert_eq!(seen.lock().unwrap().len(), 6);
    assert_eq!(state.current_state(), STATE_ONLINE);
    assert!(!state.is_transitioning());

    // Bad arguments.
    for (flags, mask, st) in [(0, 0x1, STATE_OFFLINE), (0, 0x3, 0x4), (0x1, 0x3, 1)] {
        assert!(matches!(
            state.set_current_state(flags, mask, st),
            Err(SetStateError::InvalidArg(_))
        ));
    }
    assert_eq!(
        state.capabilities(),
        offline::CAPABILITY_OFFLINE | offline::CAPABILITY_ONLINE
    );
}

// ---- hooks (P35–P40) ----

/// A scripted hook that records every call.
struct Scripted {
    name: String,
    calls: Arc<Mutex<Vec<String>>>,
    before: Box<dyn Fn() -> Before + Send + Sync>,
    after: After,
    contexts: Arc<Mutex<Vec<Option<u64>>>>,
    statuses: Arc<Mutex<Vec<Status>>>,
}

impl Scripted {
    fn new(
        name: &str,
        calls: &Arc<Mutex<Vec<String>>>,
        before: impl Fn() -> Before + Send + Sync + 'static,
        after: After,
    ) -> Arc<Scripted> {
        Arc::new(Scripted {
            name: name.into(),
            calls: calls.clone(),
            before: Box::new(before),
            after,
            contexts: Arc::default(),
            statuses: Arc::default(),
        })
    }
}

impl ConnectionHook for Scripted {
    fn name(&self) -> &str {
        &self.name
    }
    fn before<'a>(&'a self, _req: &'a HookRequest) -> HookFuture<'a, Before> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("before {}", self.name));
        Box::pin(std::future::ready((self.before)()))
    }
    fn after<'a>(
        &'a self,
        _req: &'a HookRequest,
        context: &'a Context,
        status: &'a Status,
    ) -> HookFuture<'a, After> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("after {}", self.name));
        self.contexts
            .lock()
            .unwrap()
            .push(context.downcast_ref::<u64>().copied());
        self.statuses.lock().unwrap().push(status.clone());
        Box::pin(std::future::ready(self.after))
    }
}

fn ctx(v: u64) -> Before {
    Before::Proceed(Some(Box::new(v)))
}

fn connect() -> HookRequest {
    HookRequest::new(Operation::Connect, "c1", "alice", "sse", "alice/inbox")
}

#[test]
fn p35_before_gets_no_context_and_after_gets_the_real_result() {
    let calls = Arc::default();
    let h = Scripted::new("h", &calls, || ctx(5), After::Done);
    let hooks = Hooks::default();
    hooks.register(h.clone());
    // The before signature carries no context and no status: there is nothing to pass but
    // "none" and "success", which is what the HTTP hooks send.
    let out: Result<(), _> = block_on(hooks.run(&connect(), || async { Err("refused") }));
    assert_eq!(out, Err(HookError::Failed("refused")));
    assert_eq!(
        *h.statuses.lock().unwrap(),
        [Status::Failed("refused".into())]
    );
    let out = block_on(hooks.run(&connect(), || async { Ok::<_, String>(7) }));
    assert_eq!(out, Ok(7));
    assert_eq!(h.statuses.lock().unwrap()[1], Status::Success);
}

#[test]
fn p36_no_context_means_no_after_call_and_a_context_comes_back_unchanged() {
    let calls = Arc::default();
    let silent = Scripted::new("silent", &calls, || Before::Proceed(None), After::Done);
    let keeper = Scripted::new("keeper", &calls, || ctx(0xfeed), After::Done);
    let hooks = Hooks::default();
    hooks.register(silent.clone());
    hooks.register(keeper.clone());
    block_on(hooks.run(&connect(), || async { Ok::<_, String>(()) })).unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        ["before keeper", "before silent", "after keeper"]
    );
    assert_eq!(*keeper.contexts.lock().unwrap(), [Some(0xfeed)]);
    assert!(silent.contexts.lock().unwrap().is_empty());
}

#[test]
fn p37_cancel_in_before_skips_the_operation_and_that_hook_gets_no_after() {
    let calls = Arc::default();
    let first = Scripted::new("first", &calls, || ctx(1), After::Done);
    let vetoer = Scripted::new(
        "vetoer",
        &calls,
        || Before::Cancel("not today".into()),
        After::Done,
    );
    let hooks = Hooks::default();
    hooks.register(vetoer.clone());
    hooks.register(first.clone()); // called first (reverse order)
    let attempts = AtomicUsize::new(0);
    let out = block_on(hooks.run(&connect(), || {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(()) }
    }));
    assert_eq!(
        out,
        Err(HookError::Cancelled {
            hook: "vetoer".into(),
            reason: "not today".into()
        })
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        0,
        "the operation was skipped"
    );
    assert!(vetoer.statuses.lock().unwrap().is_empty(), "no after call");
    assert_eq!(
        *first.statuses.lock().unwrap(),
        [Status::Cancelled("not today".into())],
        "a hook already called before hears of the cancel, to free its context"
    );
    // A forced cancel (the client is already gone) cannot be refused.
    let forced = connect().cancel("expiry", true);
    let out = block_on(hooks.run(&forced, || async { Ok::<_, String>(()) }));
    assert_eq!(out, Ok(()));
}

#[test]
fn p38_retry_after_a_failure_reruns_without_a_second_before_and_after_success_is_success() {
    let calls = Arc::default();
    let retrier = Scripted::new("retrier", &calls, || ctx(2), After::Retry);
    let hooks = Hooks::with_max_retries(5);
    hooks.register(retrier.clone());
    let attempts = AtomicUsize::new(0);
    let out = block_on(hooks.run(&connect(), || {
        let n = attempts.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Err(format!("busy {n}"))
            } else {
                Ok(n)
            }
        }
    }));
    assert_eq!(out, Ok(2));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let c = calls.lock().unwrap();
    assert_eq!(c.iter().filter(|c| c.starts_with("before")).count(), 1);
    assert_eq!(
        *retrier.statuses.lock().unwrap(),
        [
            Status::Failed("busy 0".into()),
            Status::Failed("busy 1".into()),
            Status::Success
        ]
    );
    assert_eq!(
        *retrier.contexts.lock().unwrap(),
        [Some(2); 3],
        "same context each time"
    );
    drop(c);

    // Retries are capped.
    let hooks = Hooks::with_max_retries(2);
    hooks.register(Scripted::new("r", &calls, || ctx(0), After::Retry));
    let attempts = AtomicUsize::new(0);
    let out: Result<(), _> = block_on(hooks.run(&connect(), || {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Err("down") }
    }));
    assert_eq!(out, Err(HookError::Failed("down")));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[test]
fn p39_before_runs_in_reverse_registration_order_and_after_in_reverse_of_that() {
    let calls = Arc::default();
    let hooks = Hooks::default();
    for name in ["a", "b", "c"] {
        hooks.register(Scripted::new(name, &calls, || ctx(1), After::Done));
    }
    block_on(hooks.run(&connect(), || async { Ok::<_, String>(()) })).unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        [
            "before c", "before b", "before a", "after a", "after b", "after c"
        ]
    );
}

#[test]
fn p40_operations_not_run_through_the_hooks_are_not_notified() {
    // The engine has no implicit hook calls: a request refused up front or a restore simply
    // never calls `run`. What this checks is that `run` is the only thing that calls hooks,
    // and that registering hooks alone calls nothing.
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let hooks = Hooks::default();
    hooks.register(Scripted::new("h", &calls, || ctx(1), After::Done));
    assert!(!hooks.is_empty());
    assert!(calls.lock().unwrap().is_empty());
}
