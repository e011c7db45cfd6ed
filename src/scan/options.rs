//! The reachability flags (valgrind's names where valgrind has one), checked into a
//! [`ScanConfig`]. cli.rs flattens [`ScanArgs`] into memleak's own arguments.
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::Class;
use super::suppress::Suppressions;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ScanArgs {
    /// Classify every report, as valgrind does (definitely, indirectly, possibly lost, still
    /// reachable): the process is stopped while its memory is scanned for pointers to each
    /// block. Without it, only the final report of a -c command is classified
    #[arg(long, conflicts_with = "no_scan")]
    pub scan: bool,

    /// Do not classify the final report of a -c command either
    #[arg(long)]
    pub no_scan: bool,

    /// Exit with this status when the final report has leaks of the kinds
    /// --errors-for-leak-kinds names (otherwise exit as the command did); 0: off
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=255))]
    pub error_exitcode: Option<i32>,

    /// Which leak kinds --error-exitcode counts: definite, indirect, possible, reachable (a
    /// comma-separated list), all or none
    #[arg(long, value_name = "KINDS", default_value = "definite,possible")]
    pub errors_for_leak_kinds: String,

    /// Leave out of reports, summaries and --error-exitcode the stacks matching a
    /// LeakSanitizer-style suppressions file: `leak:PATTERN` lines matched against each
    /// frame's function, module and source file (`*` any text, `^` and `$` anchors; `#` comments)
    #[arg(long, value_name = "FILE")]
    pub suppressions: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Off,
    /// The final report of a -c command (at its exit, while its memory still exists).
    #[default]
    Final,
    /// Every report.
    Every,
}

#[derive(Debug, Clone, Default)]
pub struct ScanConfig {
    pub mode: Mode,
    /// --error-exitcode, when not 0.
    pub error_exitcode: Option<i32>,
    /// The kinds --error-exitcode counts.
    pub error_kinds: Vec<Class>,
    pub suppressions: Option<Suppressions>,
    /// Said on stderr when the run starts (what cannot be classified, and why).
    pub notes: Vec<String>,
}

/// What the rest of the command line says that matters here.
pub struct Context {
    /// Neither -p nor -c: the kernel's allocators.
    pub kernel: bool,
    pub pid: bool,
    pub combined_only: bool,
}

/// valgrind's `--errors-for-leak-kinds` set.
pub fn parse_kinds(text: &str) -> Result<Vec<Class>> {
    let mut kinds = Vec::new();
    for word in text.split(',').map(str::trim) {
        match word {
            "all" => kinds.extend(Class::ALL),
            "none" => {}
            w => match Class::ALL.iter().find(|c| c.kind() == w) {
                Some(c) => kinds.push(*c),
                None => bail!(
                    "--errors-for-leak-kinds: unknown kind {w:?} (definite, indirect, possible, reachable, all, none)"
                ),
            },
        }
    }
    kinds.sort();
    kinds.dedup();
    Ok(kinds)
}

impl ScanArgs {
    pub fn into_config(self, ctx: &Context) -> Result<ScanConfig> {
        let error_exitcode = self.error_exitcode.filter(|&n| n != 0);
        if ctx.kernel && (self.scan || self.no_scan || error_exitcode.is_some()) {
            bail!("--scan, --no-scan and --error-exitcode classify a process's blocks: they need -p or -c");
        }
        if ctx.combined_only && (self.scan || error_exitcode.is_some()) {
            bail!("--combined-only keeps no block addresses: --scan and --error-exitcode need them");
        }
        if self.no_scan && error_exitcode.is_some() {
            bail!("--error-exitcode needs the final report classified: it does not go with --no-scan");
        }
        if ctx.pid && !self.scan && error_exitcode.is_some() {
            bail!("--error-exitcode under -p needs --scan: only a command's final report is classified by default");
        }
        let error_kinds = parse_kinds(&self.errors_for_leak_kinds)?;
        let suppressions = match &self.suppressions {
            Some(p) => Some(Suppressions::load(p)?),
            None => None,
        };
        let mut notes = Vec::new();
        let mode = if ctx.kernel || self.no_scan {
            Mode::Off
        } else if self.scan {
            Mode::Every
        } else if ctx.pid {
            // Only what memleak started is classified by default.
            Mode::Off
        } else if ctx.combined_only {
            notes.push("--combined-only keeps no block addresses: the final report is not classified".into());
            Mode::Off
        } else {
            Mode::Final
        };
        Ok(ScanConfig { mode, error_exitcode, error_kinds, suppressions, notes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context { kernel: false, pid: false, combined_only: false }
    }

    #[test]
    fn kinds_as_valgrind_names_them() {
        use Class::*;
        assert_eq!(parse_kinds("definite,possible").unwrap(), [DefinitelyLost, PossiblyLost]);
        assert_eq!(parse_kinds("all").unwrap(), Class::ALL);
        assert_eq!(parse_kinds("none").unwrap(), []);
        assert_eq!(parse_kinds("reachable, indirect").unwrap(), [IndirectlyLost, StillReachable]);
        assert!(parse_kinds("leaky").unwrap_err().to_string().contains("unknown kind \"leaky\""));
    }

    #[test]
    fn modes_and_conflicts() {
        let a = ScanArgs { errors_for_leak_kinds: "definite,possible".into(), ..Default::default() };
        assert_eq!(a.clone().into_config(&ctx()).unwrap().mode, Mode::Final);
        assert_eq!(ScanArgs { scan: true, ..a.clone() }.into_config(&ctx()).unwrap().mode, Mode::Every);
        assert_eq!(ScanArgs { no_scan: true, ..a.clone() }.into_config(&ctx()).unwrap().mode, Mode::Off);
        let kernel = Context { kernel: true, ..ctx() };
        assert_eq!(a.clone().into_config(&kernel).unwrap().mode, Mode::Off);
        assert!(ScanArgs { scan: true, ..a.clone() }.into_config(&kernel).is_err());
        let pid = Context { pid: true, ..ctx() };
        assert_eq!(a.clone().into_config(&pid).unwrap().mode, Mode::Off);
        assert_eq!(ScanArgs { scan: true, ..a.clone() }.into_config(&pid).unwrap().mode, Mode::Every);
        assert!(ScanArgs { error_exitcode: Some(3), ..a.clone() }.into_config(&pid).is_err());
        let combined = Context { combined_only: true, ..ctx() };
        let c = a.clone().into_config(&combined).unwrap();
        assert_eq!((c.mode, c.notes.len()), (Mode::Off, 1));
        assert!(ScanArgs { error_exitcode: Some(3), ..a.clone() }.into_config(&combined).is_err());
        let e = ScanArgs { error_exitcode: Some(3), no_scan: true, ..a.clone() }.into_config(&ctx()).unwrap_err();
        assert!(e.to_string().contains("--no-scan"), "{e}");
        assert_eq!(ScanArgs { error_exitcode: Some(0), ..a }.into_config(&ctx()).unwrap().error_exitcode, None);
    }
}
