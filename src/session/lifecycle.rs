//! The processes' lives as ptrace reports them: a child started (fork, vfork, clone), its first
//! stop, an exec, an exit; and which of them memleak may not trace.

use anyhow::Result;

use super::*;

impl Session<'_, '_, '_> {
    /// Handles every pending change of the traced processes and threads.
    pub(super) fn handle_changes(&mut self) -> Result<()> {
        while let Some((tid, change)) = ptrace::next_change() {
            self.handle(tid, change)?;
        }
        Ok(())
    }

    pub(super) fn handle(&mut self, tid: i32, change: Change) -> Result<()> {
        let pid = self.reg.process_of(tid);
        match change {
            Change::Exited(code) | Change::Killed(code) => {
                let exit = if matches!(change, Change::Exited(_)) { code } else { 128 + code };
                match pid {
                    Some(p) if p == tid => self.exited(p, Exit::Code(exit))?,
                    _ => {
                        self.reg.threads.remove(&tid);
                    }
                }
            }
            Change::Event(event, sig) => self.event(tid, pid, event, sig)?,
            Change::Signal(libc::SIGSTOP)
                if let Some((p, links)) = self.prober.as_deref_mut().and_then(|pr| pr.own_stop(tid)) =>
            {
                // memleak's own stop at a dlopen: the new objects are probed; suppressed.
                if let Some(pr) = self.reg.get_mut(p) {
                    pr.links.extend(links);
                }
                ptrace::cont(tid, 0);
            }
            Change::Signal(sig) => {
                // A signal on its way: delivered as it would be untraced. One that kills it
                // marks it dying (a group Ctrl-C).
                if let Some(p) = pid
                    && signals::Masks::of(p).is_some_and(|m| m.kills(sig))
                    && let Some(pr) = self.reg.get_mut(p)
                {
                    pr.dying = true;
                }
                ptrace::cont(tid, sig);
            }
        }
        Ok(())
    }

    pub(super) fn event(&mut self, tid: i32, pid: Option<i32>, event: i32, sig: i32) -> Result<()> {
        match event {
            libc::PTRACE_EVENT_EXIT => {
                if let Some(p) = pid
                    && p == tid
                {
                    if let Some(pr) = self.reg.get_mut(p) {
                        pr.dying = true;
                    }
                    // Its memory still exists: its blocks are classified now, for its final
                    // report.
                    if let Some(pr) = self.reg.get(p) {
                        let who = self.subject(pr, None).scan;
                        self.rep.scan_at_exit(p, tid, &who);
                    }
                    // Its memory map still exists: the last chance to open the files its last
                    // walks met (their wake-ups may still wait in the ring) and to normalize.
                    self.drain_rings()?;
                    self.rep.symbolizer.reread_maps(p);
                    self.rep.prepare_symbols()?;
                }
                ptrace::cont(tid, 0);
            }
            libc::PTRACE_EVENT_EXEC => {
                // After an exec the thread group is one thread, the process's own id.
                let p = pid.unwrap_or(tid);
                self.reg.threads.retain(|_, owner| *owner != p);
                self.exec_stop(p);
                ptrace::cont(p, 0);
            }
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK | libc::PTRACE_EVENT_CLONE => {
                if let (Some(parent), Some(child)) = (pid, ptrace::event_msg(tid)) {
                    self.started(parent, child as i32);
                }
                ptrace::cont(tid, 0);
            }
            libc::PTRACE_EVENT_STOP => {
                if sig == libc::SIGTRAP {
                    // A new child's (or thread's) first stop: a process waits until its probes
                    // are on; see `started`.
                    self.first_stop(tid);
                } else {
                    // A group-stop: it stays stopped, as it would untraced.
                    ptrace::listen(tid);
                }
            }
            _ => ptrace::cont(tid, 0),
        }
        Ok(())
    }

    /// A traced process started `child` (a process, or a thread of its own).
    pub(super) fn started(&mut self, parent: i32, child: i32) {
        if is_thread_of(child, parent) {
            self.reg.threads.insert(child, parent);
            return;
        }
        if self.reg.contains(child) {
            // Its first stop came first: it was started then.
            return;
        }
        let mut p = Process::new(child, Origin::Child { parent });
        p.ptraced = true;
        p.starting = true;
        self.reg.insert(p);
    }

    /// The first stop of an auto-attached thread or process: a new process waits in it until
    /// its probes are on.
    pub(super) fn first_stop(&mut self, tid: i32) {
        if let Some(p) = self.reg.get(tid) {
            if p.starting {
                self.start_child(tid);
            } else {
                ptrace::cont(tid, 0);
            }
            return;
        }
        if self.reg.threads.contains_key(&tid) {
            ptrace::cont(tid, 0);
            return;
        }
        // Its parent's event stop is still to come: a thread of a traced process, or a new
        // process, known by its ids.
        let (tgid, ppid) = ids_of(tid);
        if let Some(tgid) = tgid.filter(|&g| g != tid && self.reg.contains(g)) {
            self.reg.threads.insert(tid, tgid);
            ptrace::cont(tid, 0);
            return;
        }
        let mut p = Process::new(tid, Origin::Child { parent: ppid.unwrap_or(0) });
        p.ptraced = true;
        p.starting = true;
        self.reg.insert(p);
        self.start_child(tid);
    }

    /// Starts a new child: its probes (it has its parent's mappings), then it runs.
    pub(super) fn start_child(&mut self, pid: i32) {
        let attached = match self.prober.as_deref_mut() {
            Some(prober) => {
                prober.set_traced(pid, true);
                prober.attach(pid, At::Forked)
            }
            None => Ok(Attached { links: Vec::new(), glibc: false, preload: false }),
        };
        match attached {
            Ok(a) => {
                if a.preload {
                    let parent = match self.reg.get(pid).map(|p| p.origin) {
                        Some(Origin::Child { parent }) => Some(parent),
                        _ => None,
                    };
                    if let Some(c) = self.rep.preload.as_mut() {
                        c.expect(pid, parent);
                    }
                }
                if let Some(p) = self.reg.get_mut(pid) {
                    p.links = a.links;
                    p.glibc = a.glibc;
                    p.starting = false;
                    p.refresh_comm();
                    if self.cfg.verbose
                        && let Origin::Child { parent } = p.origin
                    {
                        errln!("memleak: following pid {pid} ({}), started by pid {parent}", p.comm);
                    }
                }
                if let Some(u) = self.rep.unwind.as_mut() {
                    u.sync(&mut self.rep.symbolizer.objects, &[pid]);
                }
                ptrace::cont(pid, 0);
            }
            Err(e) => {
                self.not_traced(pid, &format!("{e:#}"));
                self.untrace(pid);
            }
        }
    }

    /// An exec stop: a new image. Its allocator is found and probed before it runs, unless
    /// it runs as a user memleak must not trace for the invoking one.
    pub(super) fn exec_stop(&mut self, pid: i32) {
        if let Some(why) = self.forbidden(pid) {
            self.not_traced(pid, &why);
            self.untrace(pid);
            return;
        }
        if let Some(u) = self.rep.unwind.as_mut() {
            u.load_exec(&mut self.rep.symbolizer.objects, pid);
        }
        // The old image's in-process records are gone with it (its stacks read first).
        if self.rep.preload.is_some() {
            let _ = self.rep.prepare_symbols();
            if let Some(c) = self.rep.preload.as_mut() {
                c.forget(pid);
            }
        }
        self.reattach(pid, At::Exec);
    }

    /// Why process `pid` must not be traced, if it must not: under sudo, a process that runs
    /// with another user's or group's ids than the invoking user's (a set-user-ID program,
    /// `sudo -u other`), as the kernel would not let that user trace it.
    pub(super) fn forbidden(&self, pid: i32) -> Option<String> {
        let (uid, gid) = self.user?;
        let (uids, gids) = ptrace::credentials(pid)?;
        if uids.iter().all(|&u| u == uid) && gids.iter().all(|&g| g == gid) {
            return None;
        }
        Some(format!(
            "it runs as uid {} gid {} (set-user-ID or set-group-ID, or another user's), which the invoking user (uid {uid}) may not trace",
            uids[1], gids[1]
        ))
    }

    /// Stops tracing process `pid` (it goes on running): no probes, no ptrace, no records.
    pub(super) fn untrace(&mut self, pid: i32) {
        if let Some(prober) = self.prober.as_deref() {
            prober.set_traced(pid, false);
        }
        if let Some(p) = self.reg.remove(pid) {
            if p.ptraced {
                for tid in ptrace::threads(pid) {
                    ptrace::detach(tid, 0);
                }
            }
            drop_links(p.links);
        }
        self.rep.retire(pid as u32, None);
    }

    /// Process `pid` exited: its final report (everything it never freed), then it is
    /// forgotten.
    pub(super) fn exited(&mut self, pid: i32, exit: Exit) -> Result<()> {
        let Some(p) = self.reg.get(pid) else { return Ok(()) };
        let starting = p.starting;
        let subject = self.subject(p, Some(exit));
        if starting {
            self.untrace(pid);
            return Ok(());
        }
        if self.reg.command == Some(pid) {
            self.reg.command_exit = Some(exit);
        }
        let line = match exit {
            Exit::Code(c) => format!("Process {pid} exited with status {c}."),
            Exit::Exited => format!("Process {pid} exited."),
        };
        status(&self.rep, &line)?;
        let last = self.reg.len() == 1 && self.cgroup.is_none();
        let snaps = self.rep.report(&[subject], last)?;
        if let Some(prober) = self.prober.as_deref() {
            prober.set_traced(pid, false);
        }
        if let Some(p) = self.reg.remove(pid) {
            drop_links(p.links);
        }
        self.rep.retire(pid as u32, snaps.into_iter().next());
        Ok(())
    }
}

/// Whether `tid` is a thread of process `pid` (not a process of its own).
fn is_thread_of(tid: i32, pid: i32) -> bool {
    tid != pid && ids_of(tid).0 == Some(pid)
}

/// The process (Tgid) and parent (PPid) of a thread id.
fn ids_of(tid: i32) -> (Option<i32>, Option<i32>) {
    crate::procfs::Status::of(tid).map_or((None, None), |s| (s.tgid, s.ppid))
}
