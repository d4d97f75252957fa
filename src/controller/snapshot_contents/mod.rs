//! csi-snapshotter's job, in-process: for each VolumeSnapshotContent of a
//! `--csi-driver` with CREATE_DELETE_SNAPSHOT, or of `local.stowage.dev`
//! (whose snapshots are Volumes its node agents cut, see `local`), cut the
//! snapshot
//! (CreateSnapshot named after the VolumeSnapshot's UID), report it in the
//! content's status until it is ready, check pre-provisioned ones with
//! ListSnapshots, and delete it (policy Delete) when snapshot-controller
//! says its VolumeSnapshot is gone. snapshot-controller, the cluster
//! add-on that binds VolumeSnapshots to contents, stays as upstream ships
//! it.
//!
//! The VolumeSnapshot CRDs are installed with snapshot-controller, not by
//! stowage: until they are served the job waits (and says so once), so a
//! cluster without snapshots runs as before and one that adds them later
//! needs no restart.

mod apply;
mod local;
mod plan;

pub use plan::{Step, plan};

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::informer::{Informer, Informers};
use super::job::{Job, JobRun, Retry};
use super::{Context, Error};
use crate::crd::Volume;
use crate::kubeapi;
use crate::snapshot_api::VolumeSnapshotContent;
use apply::{Backend, Outcome};

const JOB: &str = "snapshot_content";
/// How often a cluster without the VolumeSnapshot CRDs is asked again.
const CRD_POLL: Duration = Duration::from_secs(30);

pub fn controller(ctx: Arc<Context>, informers: &mut Informers) -> JobRun {
    // A local snapshot is ready when its Volume is: that Volume's changes
    // wake the content at once instead of its next poll.
    let volumes = informers.volumes.subscribe();
    async move {
        if ctx.drivers.is_empty() && !ctx.serve_local {
            return;
        }
        let mut volumes = Box::pin(volumes);
        // Volume changes before the CRDs are served concern no content.
        let drained = (&mut volumes).for_each(|_| async {});
        tokio::select! {
            () = wait_for_crds(&ctx) => {}
            () = drained => {}
        }
        let mut contents = Informer::<VolumeSnapshotContent>::default();
        let served = ctx.clone();
        contents.keep_only(move |c| served.serves(&c.spec.driver));
        let stream = contents.subscribe();
        let store = contents.store();
        ctx.watches.add(contents.progress());
        let watch = contents.run(Api::all(ctx.client.clone()));
        let job = Job {
            name: JOB,
            retry: Retry::BackoffUnlessGone,
        };
        let controller =
            Controller::for_shared_stream(stream, store).watches_shared_stream(volumes, content_of);
        let run = job.run(controller, reconcile, ctx);
        futures::future::join(watch, run).await;
    }
    .boxed()
}

/// The content a local snapshot Volume was cut for: snapshot-controller
/// names a dynamic content `snapcontent-<VolumeSnapshot uid>`, and the job
/// names its Volume `snapshot-<the same uid>` (`plan::snapshot_name`).
fn content_of(volume: Arc<Volume>) -> Option<ObjectRef<VolumeSnapshotContent>> {
    volume.spec.source.as_ref()?;
    let uid = volume.name_any().strip_prefix("snapshot-")?.to_string();
    Some(ObjectRef::new(&format!("snapcontent-{uid}")))
}

/// Returns once VolumeSnapshotContents can be listed.
async fn wait_for_crds(ctx: &Context) {
    kubeapi::wait_until_served(
        &Api::<VolumeSnapshotContent>::all(ctx.client.clone()),
        CRD_POLL,
        "no VolumeSnapshot CRDs in this cluster: snapshots wait until external-snapshotter's CRDs and snapshot-controller are installed",
        "VolumeSnapshot CRDs served: handling VolumeSnapshotContents",
    )
    .await;
}

#[tracing::instrument(skip_all, fields(content = %content.name_any()))]
async fn reconcile(
    content: Arc<VolumeSnapshotContent>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let step = plan(&content);
    if step == Step::Nothing {
        return Ok(Action::await_change());
    }
    let backend = match ctx.drivers.get(&content.spec.driver) {
        Some(driver) => Backend::Driver(driver),
        None if ctx.serves(&content.spec.driver) => Backend::Local,
        None => return Ok(Action::await_change()),
    };
    let _timer = ctx.metrics.jobs.reconcile_timer(JOB);
    tracing::debug!(?step, "planned");
    let key = content.object_ref(&());
    match apply::apply(&ctx, &backend, &content, step).await? {
        Outcome::Done => {
            ctx.forget_failures(&key);
            Ok(Action::await_change())
        }
        // Asked again at the object's growing interval, as csi-snapshotter
        // polls a snapshot still being cut.
        Outcome::NotReady => Ok(Action::requeue(ctx.backoff(&key, true))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VolumeSource;
    use crate::testing::{volume, volume_spec};

    #[test]
    fn a_snapshot_volume_wakes_the_content_it_was_cut_for_and_no_other() {
        let mut spec = volume_spec("local.stowage.dev", 1 << 20);
        let claim_volume = volume("snapshot-of-nothing", spec.clone());
        spec.source = Some(VolumeSource::Volume("pvc-1".into()));
        let cut = volume("snapshot-0c1d", spec.clone());
        let other = volume("pvc-2", spec);
        assert_eq!(
            content_of(Arc::new(cut)),
            Some(ObjectRef::new("snapcontent-0c1d"))
        );
        assert_eq!(content_of(Arc::new(claim_volume)), None, "no source");
        assert_eq!(content_of(Arc::new(other)), None, "not a snapshot's");
    }
}
