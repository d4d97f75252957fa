//! What every job shares: its trigger channels, the gate before each
//! reconcile, and one policy for failed reconciles.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;

use super::{Context, Error, informer};

/// A job running until the process ends, as `controller::run` holds it.
pub type JobRun = futures::future::BoxFuture<'static, ()>;

/// A trigger for one job: reconcile requests sent from another kind's
/// events (deletions above all). Unbounded, so that a hook on a watch never
/// waits for a job.
pub(crate) fn trigger<K: Resource<DynamicType = ()> + 'static>() -> (
    mpsc::UnboundedSender<ObjectRef<K>>,
    impl Stream<Item = ObjectRef<K>> + Send + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
}

/// When a job asks again after a failed reconcile.
pub(crate) enum Retry<K> {
    /// At the object's growing backoff (crate::retry).
    Backoff,
    /// The same, but an object gone while we worked on it (404) waits for
    /// its next change: for jobs whose own object was the one written.
    BackoffUnlessGone,
    /// After what the job computes.
    After(fn(&Context, &K, &Error) -> Duration),
}

/// Counts a failed reconcile by job and error: those `on_failure` sees,
/// and those a job handles itself instead of returning them, a refusal
/// its plan explains on the object or a periodic pass that failed.
pub(crate) fn count_failure(ctx: &Context, job: &'static str, error: &'static str) {
    ctx.metrics.jobs.reconcile_failed(job, error);
}

/// A periodic job's pass, or a step of one, that failed: logged with what
/// it was `doing`, and counted. The next pass looks again.
pub(crate) fn pass_failed(ctx: &Context, job: &'static str, doing: &str, error: &Error) {
    tracing::warn!(job, %error, "{doing} failed");
    count_failure(ctx, job, error.metric_label());
}

/// One job: its name (metric and log label) and retry rule.
pub(crate) struct Job<K> {
    pub name: &'static str,
    pub retry: Retry<K>,
}

impl<K: informer::Kind> Job<K> {
    /// Every failed reconcile, the same way: a conflict (someone wrote
    /// first, often kcm's binder) is replanned at once; otherwise the
    /// failure is logged, explained on the object when RBAC refused it,
    /// counted by job and reason, and asked again per `retry`.
    fn on_failure(&self, object: &K, error: &Error, ctx: &Context) -> Action {
        if error.is_conflict() {
            return Action::requeue(Duration::from_millis(50));
        }
        if matches!(self.retry, Retry::BackoffUnlessGone) && error.is_not_found() {
            return Action::await_change();
        }
        let key = format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        );
        tracing::warn!(job = self.name, object = %key.trim_start_matches('/'), %error, "reconcile failed");
        ctx.report_if_forbidden(object, error);
        count_failure(ctx, self.name, error.metric_label());
        Action::requeue(match self.retry {
            Retry::After(delay) => delay(ctx, object, error),
            Retry::Backoff | Retry::BackoffUnlessGone => ctx.backoff(&object.object_ref(&()), true),
        })
    }

    /// Runs the job's controller until the process ends. Its streams are
    /// drained from the start; each reconcile first passes the gate, so
    /// none acts before this replica leads with complete caches, or after
    /// it began to stop.
    pub(crate) fn run<F, Fut>(
        self,
        controller: Controller<K>,
        reconcile: F,
        ctx: Arc<Context>,
    ) -> JobRun
    where
        F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Action, Error>> + Send + 'static,
        K: Send + Sync,
        Retry<K>: Send + Sync,
    {
        let workers = ctx.workers;
        controller
            .with_config(controller::Config::default().concurrency(workers))
            .run(
                move |object, ctx| {
                    // Lazy until polled: nothing happens before the gate.
                    let reconcile = reconcile(object, ctx.clone());
                    async move {
                        let Some(_pass) = ctx.gate.enter().await else {
                            return Ok(Action::await_change());
                        };
                        reconcile.await
                    }
                },
                move |object, error, ctx| self.on_failure(&object, error, &ctx),
                ctx,
            )
            .for_each(|_| async {})
            .boxed()
    }
}
