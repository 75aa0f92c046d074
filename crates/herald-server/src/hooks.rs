//! The server's connection hooks: external HTTP hooks configured by URL, and the built-in
//! audit log and allow/deny list. The calling rules (order, context, cancel, retry) are the
//! engine's ([`herald_core::hooks`]).
//!
//! An external hook receives a JSON [`HookCall`] and answers with a [`HookAnswer`]; a hook
//! that cannot be reached in time, or answers anything else, counts as its `failure` policy
//! says: `open` (as if it had answered nothing) or `closed` (the connect is refused).

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use herald_core::hooks::{
    After, Before, ConnectionHook, Context, HookFuture, HookRequest, Hooks, Operation, Status,
};
use serde::{Deserialize, Serialize};

use herald_delivery::ConnectError;

use crate::config::{AccessRule, HookFailure, HooksConfig, HttpHookConfig};
use crate::error::ApiError;
use crate::metrics::names;

/// What Herald POSTs to an external hook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookCall {
    /// `before` or `after`.
    pub phase: String,
    /// `connect` or `cancel`.
    pub operation: String,
    /// The connection or subscription id.
    pub connection: String,
    /// Who.
    pub owner: String,
    /// `sse`, `ws`, `poll`, `udp`, `webhook`, `ews`, `mapi`.
    pub transport: String,
    /// The key, subtree or mailbox.
    pub target: String,
    /// For a cancel: `unsubscribe`, `close`, `expiry`, `kick`, `shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A cancel that cannot be refused.
    pub forced: bool,
    /// `null` in `before`; in `after`, what the hook answered in `before`, unchanged.
    pub context: serde_json::Value,
    /// `success` in `before`; in `after`, `success`, `failed` or `cancelled`.
    pub status: String,
    /// For `failed` and `cancelled`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an external hook answers (an empty body means `{}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HookAnswer {
    /// In `before`: `proceed` (the default) or `cancel`; in `after`: `done` (the default) or
    /// `retry`.
    pub decision: Option<String>,
    /// With `cancel`: the reason the client is told.
    pub reason: Option<String>,
    /// In `before`: kept and sent back in `after`; absent or `null` means no `after` call.
    pub context: serde_json::Value,
}

/// An external hook.
pub struct HttpHook {
    name: String,
    config: HttpHookConfig,
    client: reqwest::Client,
}

impl HttpHook {
    /// A hook calling `config.url`.
    pub fn new(index: usize, config: HttpHookConfig) -> anyhow::Result<HttpHook> {
        let url = url::Url::parse(&config.url)
            .map_err(|e| anyhow::anyhow!("hooks.http[{index}].url {:?}: {e}", config.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("hooks.http[{index}].url must be http or https");
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(HttpHook {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| format!("hook {}", index + 1)),
            config,
            client,
        })
    }

    fn call(req: &HookRequest, phase: &str) -> HookCall {
        HookCall {
            phase: phase.into(),
            operation: req.operation.as_str().into(),
            connection: req.connection.clone(),
            owner: req.owner.clone(),
            transport: req.transport.clone(),
            target: req.target.clone(),
            reason: req.reason.clone(),
            forced: req.forced,
            context: serde_json::Value::Null,
            status: "success".into(),
            error: None,
        }
    }

    async fn post(&self, call: &HookCall) -> Result<HookAnswer, String> {
        let resp = self
            .client
            .post(&self.config.url)
            .json(call)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    format!("no answer within {:?}", self.config.timeout)
                } else {
                    format!("unreachable: {e}")
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("answer broke off: {e}"))?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(HookAnswer::default());
        }
        serde_json::from_slice(&body).map_err(|e| format!("answered invalid JSON: {e}"))
    }

    fn count(&self, phase: &'static str, decision: &'static str) {
        metrics::counter!(names::HOOK_CALLS, "hook" => self.name.clone(), "phase" => phase, "decision" => decision)
            .increment(1);
    }
}

impl ConnectionHook for HttpHook {
    fn name(&self) -> &str {
        &self.name
    }

    fn before<'a>(&'a self, req: &'a HookRequest) -> HookFuture<'a, Before> {
        Box::pin(async move {
            match self.post(&Self::call(req, "before")).await {
                Ok(answer) => match answer.decision.as_deref() {
                    Some("cancel") => {
                        self.count("before", "cancel");
                        Before::Cancel(
                            answer
                                .reason
                                .unwrap_or_else(|| "refused by a hook".to_owned()),
                        )
                    }
                    None | Some("proceed") => {
                        self.count("before", "proceed");
                        if answer.context.is_null() {
                            Before::Proceed(None)
                        } else {
                            Before::Proceed(Some(Box::new(answer.context)))
                        }
                    }
                    Some(other) => self.failed(format!("answered unknown decision {other:?}")),
                },
                Err(e) => self.failed(e),
            }
        })
    }

    fn after<'a>(
        &'a self,
        req: &'a HookRequest,
        context: &'a Context,
        status: &'a Status,
    ) -> HookFuture<'a, After> {
        Box::pin(async move {
            let mut call = Self::call(req, "after");
            call.context = context
                .downcast_ref::<serde_json::Value>()
                .cloned()
                .unwrap_or_default();
            (call.status, call.error) = match status {
                Status::Success => ("success".into(), None),
                Status::Failed(e) => ("failed".into(), Some(e.clone())),
                Status::Cancelled(r) => ("cancelled".into(), Some(r.clone())),
            };
            match self.post(&call).await {
                Ok(a) if a.decision.as_deref() == Some("retry") => {
                    self.count("after", "retry");
                    After::Retry
                }
                Ok(_) => {
                    self.count("after", "done");
                    After::Done
                }
                Err(e) => {
                    self.count("after", "error");
                    tracing::warn!(hook = %self.name, error = %e, "hook after-call failed");
                    After::Done
                }
            }
        })
    }
}

impl HttpHook {
    fn failed(&self, error: String) -> Before {
        self.count("before", "error");
        match self.config.failure {
            HookFailure::Open => {
                tracing::warn!(hook = %self.name, %error, "hook failed; going on (failure = open)");
                Before::Proceed(None)
            }
            HookFailure::Closed => {
                tracing::warn!(hook = %self.name, %error, "hook failed; refusing (failure = closed)");
                Before::Cancel(format!("{} is unavailable ({error})", self.name))
            }
        }
    }
}

/// Writes every connect and cancel, and how it ended, to the `herald::audit` target.
pub struct AuditHook;

impl ConnectionHook for AuditHook {
    fn name(&self) -> &str {
        "audit"
    }

    fn before<'a>(&'a self, _req: &'a HookRequest) -> HookFuture<'a, Before> {
        Box::pin(std::future::ready(Before::Proceed(Some(Box::new(
            Instant::now(),
        )))))
    }

    fn after<'a>(
        &'a self,
        req: &'a HookRequest,
        context: &'a Context,
        status: &'a Status,
    ) -> HookFuture<'a, After> {
        let ms = context
            .downcast_ref::<Instant>()
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        let (result, error) = match status {
            Status::Success => ("success", ""),
            Status::Failed(e) => ("failed", e.as_str()),
            Status::Cancelled(r) => ("cancelled", r.as_str()),
        };
        tracing::info!(
            target: "herald::audit",
            operation = req.operation.as_str(),
            connection = %req.connection,
            owner = %req.owner,
            transport = %req.transport,
            target = %req.target,
            reason = req.reason.as_deref().unwrap_or(""),
            result,
            error,
            ms,
            "{} {}", req.operation.as_str(), result
        );
        Box::pin(std::future::ready(After::Done))
    }
}

/// Refuses connects by owner, key prefix and transport.
pub struct AccessHook {
    allow: Vec<AccessRule>,
    deny: Vec<AccessRule>,
}

fn matches(rule: &AccessRule, req: &HookRequest) -> bool {
    let owner = rule
        .owner
        .as_deref()
        .is_none_or(|o| o == "*" || o == req.owner);
    let transport = rule.transport.as_deref().is_none_or(|t| t == req.transport);
    let prefix = rule.prefix.as_deref().is_none_or(|p| {
        let p = p.trim_end_matches('/');
        p.is_empty()
            || req.target == p
            || req
                .target
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    owner && transport && prefix
}

impl AccessHook {
    /// The decision for `req`: `None` to let it through, or the reason to refuse.
    fn refusal(&self, req: &HookRequest) -> Option<String> {
        if req.operation != Operation::Connect {
            return None;
        }
        let allowed = self.allow.iter().any(|r| matches(r, req));
        if allowed {
            return None;
        }
        if self.deny.iter().any(|r| matches(r, req)) {
            return Some(format!(
                "{} may not connect to {:?} over {} (hooks.access.deny)",
                req.owner, req.target, req.transport
            ));
        }
        if self.deny.is_empty() && !self.allow.is_empty() {
            return Some(format!(
                "{} may not connect to {:?} over {}: no hooks.access.allow rule lets it",
                req.owner, req.target, req.transport
            ));
        }
        None
    }
}

impl ConnectionHook for AccessHook {
    fn name(&self) -> &str {
        "access"
    }

    fn before<'a>(&'a self, req: &'a HookRequest) -> HookFuture<'a, Before> {
        let out = match self.refusal(req) {
            Some(reason) => Before::Cancel(reason),
            None => Before::Proceed(None),
        };
        Box::pin(std::future::ready(out))
    }

    fn after<'a>(
        &'a self,
        _req: &'a HookRequest,
        _context: &'a Context,
        _status: &'a Status,
    ) -> HookFuture<'a, After> {
        Box::pin(std::future::ready(After::Done))
    }
}

/// The hooks `config` describes, registered so that their *before* calls run in this order:
/// the audit log (so that it sees refusals too), the allow/deny list, then the external hooks
/// from the last configured to the first.
pub fn from_config(config: &HooksConfig) -> anyhow::Result<Hooks> {
    let hooks = Hooks::with_max_retries(
        config
            .max_retries
            .unwrap_or(herald_core::hooks::DEFAULT_MAX_RETRIES),
    );
    for (i, h) in config.http.iter().enumerate() {
        hooks.register(Arc::new(HttpHook::new(i, h.clone())?));
    }
    if !config.access.allow.is_empty() || !config.access.deny.is_empty() {
        hooks.register(Arc::new(AccessHook {
            allow: config.access.allow.clone(),
            deny: config.access.deny.clone(),
        }));
    }
    if config.audit {
        hooks.register(Arc::new(AuditHook));
    }
    Ok(hooks)
}

/// The HTTP answer to a connect a hook refused: 403 with the reason.
pub fn refused(hook: &str, reason: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "refused_by_hook",
        format!("{hook}: {reason}"),
    )
}

/// Turns a hooked operation's failure into the API's error.
pub fn api_error<E: Into<ApiError>>(e: ConnectError<E>) -> ApiError {
    match e {
        ConnectError::Refused { hook, reason } => refused(&hook, &reason),
        ConnectError::Busy => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the server is busy recording connections; retry shortly",
        ),
        ConnectError::Failed(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(owner: Option<&str>, prefix: Option<&str>, transport: Option<&str>) -> AccessRule {
        AccessRule {
            owner: owner.map(Into::into),
            prefix: prefix.map(Into::into),
            transport: transport.map(Into::into),
        }
    }

    fn connect(owner: &str, target: &str) -> HookRequest {
        HookRequest::new(Operation::Connect, "c", owner, "sse", target)
    }

    #[test]
    fn deny_rules_refuse_unless_an_allow_rule_matches() {
        let access = AccessHook {
            allow: vec![rule(Some("mallory"), Some("mallory"), None)],
            deny: vec![
                rule(None, Some("secret"), None),
                rule(Some("mallory"), None, None),
            ],
        };
        assert!(access.refusal(&connect("alice", "secret/plans")).is_some());
        assert!(access.refusal(&connect("alice", "secret")).is_some());
        assert!(
            access.refusal(&connect("alice", "secretive/x")).is_none(),
            "segments, not bytes"
        );
        assert!(access.refusal(&connect("alice", "public/x")).is_none());
        assert!(access.refusal(&connect("mallory", "public/x")).is_some());
        assert!(
            access
                .refusal(&connect("mallory", "mallory/inbox/"))
                .is_none()
        );
        let cancel = connect("mallory", "public/x").cancel("close", false);
        assert!(
            access.refusal(&cancel).is_none(),
            "cancels are never refused by the list"
        );
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// What Herald sends and what a hook answers survive a JSON round trip unchanged
        /// (the context a hook keeps must come back exactly).
        #[test]
        fn hook_messages_round_trip(
            context in json_value(),
            decision in proptest::option::of("proceed|cancel|retry|done|.{0,8}"),
            reason in proptest::option::of(".{0,16}"),
            owner in ".{0,16}",
            forced in proptest::bool::ANY,
        ) {
            let answer = HookAnswer { decision, reason: reason.clone(), context: context.clone() };
            let back: HookAnswer = serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
            proptest::prop_assert_eq!(back, answer);
            let mut req = HookRequest::new(Operation::Connect, "c-1", owner, "sse", "k/1/");
            req.forced = forced;
            req.reason = reason;
            let mut call = HttpHook::call(&req, "after");
            call.context = context;
            let back: HookCall = serde_json::from_slice(&serde_json::to_vec(&call).unwrap()).unwrap();
            proptest::prop_assert_eq!(back, call);
        }
    }

    #[test]
    fn allow_rules_alone_are_a_whitelist() {
        let access = AccessHook {
            allow: vec![rule(Some("*"), Some("shared"), Some("sse"))],
            deny: vec![],
        };
        assert!(access.refusal(&connect("anyone", "shared/x")).is_none());
        assert!(access.refusal(&connect("anyone", "other/x")).is_some());
        let mut ws = connect("anyone", "shared/x");
        ws.transport = "ws".into();
        assert!(access.refusal(&ws).is_some());
    }
}
