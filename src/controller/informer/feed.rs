//! A running watch: each event into the cache, then to the hooks and the
//! jobs; a relist compared with the cache it replaces.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::{Informer, Kind, Relist};

impl<K: Kind> Informer<K> {
    /// Feeds the cache and the jobs from `events` (a watcher's output).
    pub(crate) fn run_on<S>(self, events: S) -> impl Future<Output = ()> + Send + 'static
    where
        S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    {
        let mut feed = Feed {
            informer: self,
            relist: None,
        };
        async move {
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => feed.handle(event),
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
                    }
                }
            }
        }
    }

    fn in_scope(&self, o: &K) -> bool {
        self.scope.as_ref().is_none_or(|keep| keep(o))
    }

    /// Tells the hooks, then the jobs, of an object now in the cache.
    fn applied(&self, o: Arc<K>) {
        for hook in &self.on_apply {
            hook(&o);
        }
        for s in &self.subscribers {
            // A job that stopped has dropped its receiver: nothing to do.
            let _ = s.send(o.clone());
        }
    }

    fn deleted(&self, o: &K) {
        for hook in &self.on_delete {
            hook(o);
        }
    }
}

/// A running informer: the cache as it was when the current list began.
struct Feed<K: Kind> {
    informer: Informer<K>,
    relist: Option<Relist<K>>,
}

impl<K: Kind> Feed<K> {
    fn handle(&mut self, event: watcher::Event<K>) {
        let i = &mut self.informer;
        match event {
            watcher::Event::Init => {
                i.writer.apply_watcher_event(&watcher::Event::Init);
                i.progress.list_started();
                self.relist = Some(Relist::begin(i.store.state()));
            }
            watcher::Event::InitApply(o) => {
                if i.in_scope(&o) {
                    i.writer.apply_watcher_event(&watcher::Event::InitApply(o));
                }
                i.progress.advanced(false);
            }
            watcher::Event::InitDone => self.listed(),
            watcher::Event::Apply(o) => {
                i.progress.advanced(true);
                self.apply(o);
            }
            watcher::Event::Delete(o) => {
                i.progress.advanced(true);
                i.writer
                    .apply_watcher_event(&watcher::Event::Delete(o.clone()));
                i.deleted(&o);
            }
        }
    }

    /// A list is complete: what it no longer holds is deleted, what it
    /// holds anew or changed is applied.
    fn listed(&mut self) {
        let i = &mut self.informer;
        i.writer.apply_watcher_event(&watcher::Event::InitDone);
        let after = i.store.state();
        tracing::debug!(kind = %K::kind(&()), objects = after.len(), "listed");
        let changes = self.relist.take().unwrap_or_default().finish(&after);
        if !changes.deleted.is_empty() {
            tracing::info!(
                kind = %K::kind(&()),
                deleted = changes.deleted.len(),
                "objects deleted (or out of scope) since the last list"
            );
        }
        for gone in &changes.deleted {
            i.deleted(gone);
        }
        for o in changes.changed {
            i.applied(o);
        }
        i.progress.advanced(true);
    }

    /// A watched change; an object that left the scope leaves the cache.
    fn apply(&mut self, o: K) {
        let i = &mut self.informer;
        let key = ObjectRef::from_obj(&o);
        if i.in_scope(&o) {
            i.writer.apply_watcher_event(&watcher::Event::Apply(o));
            // The cache's copy: no second one while jobs catch up.
            if let Some(cached) = i.store.get(&key) {
                i.applied(cached);
            }
        } else if i.store.get(&key).is_some() {
            i.writer
                .apply_watcher_event(&watcher::Event::Delete(o.clone()));
            i.deleted(&o);
        }
    }
}
