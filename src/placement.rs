//! Probe placement: where in a function its entry uprobe costs least.
//!
//! The x86 uprobe code emulates a few instructions in the kernel (push of a register, relative
//! jmp/call/jcc, nop) and single-steps every other one out of line, which costs a second trap:
//! about 10 us here against 0.55 us (docs/probe-placement.md). So the probe goes on the first
//! instruction the kernel emulates, provided every instruction before it is safe to pass: none
//! branches, writes memory, moves the stack, writes a callee-saved register the unwinder reads,
//! or loses an argument the probe reads. An argument copied to another argument register
//! (`mov %rdi,%rsi`) before its own is overwritten is read from the copy: the placement says
//! where each argument is (`Placement::args`), and the BPF cookie names that register.
//! Otherwise the probe stays at the entry.
use std::sync::atomic::{AtomicBool, Ordering};

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind, Register,
};

/// How many instructions past the entry the search looks.
const MAX_INSNS: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's entry to the probed instruction.
    pub delta: u64,
    /// The probed instruction, as text (for -v and docs).
    pub insn: String,
    /// Why the search stopped, when the probe stays on a single-stepped instruction.
    pub note: Option<String>,
    /// Where each argument the probe reads is at the probed instruction: args[n] is the
    /// register (1-6: rdi, rsi, rdx, rcx, r8, r9, the argument registers; 7: rax) holding
    /// argument n; n itself unless the code before the probe copied it elsewhere and overwrote
    /// it.
    pub args: [u8; 7],
}

/// The registers a cookie can name, 1-7: the argument registers in the calling convention's
/// order (argument 1 is rdi), then rax (a scratch register compilers copy arguments into).
const ARG_REGS: [Register; 7] =
    [Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9, Register::RAX];

/// Registers the probe reads besides arguments: rsp (the return address), and what the
/// unwinder reads (rbp and the callee-saved registers).
const ALWAYS_READ: &[Register] =
    &[Register::RSP, Register::RBP, Register::RBX, Register::R12, Register::R13, Register::R14, Register::R15];

fn arg_index(r: Register) -> Option<usize> {
    ARG_REGS.iter().position(|&a| a == r.full_register()).map(|i| i + 1)
}

/// What the probe reads: argument numbers (1-6), and whether they may be read from a copy
/// (the cookie names the register; false: the BPF program reads fixed registers).
#[derive(Debug, Clone, Copy)]
pub struct Reads<'a> {
    pub args: &'a [u8],
    pub movable: bool,
}

#[cfg(test)]
impl Reads<'_> {
    /// Every argument, read where it is at entry: the rule before the table's meanings.
    pub const ALL: Reads<'static> = Reads { args: &[1, 2, 3, 4, 5, 6], movable: false };
}

/// The kernel emulates multi-byte nops and optimizes a uprobe on a 5-byte nop into a call to
/// its trampoline (Linux 6.18: 556 ns a hit instead of 860 for an emulated push, a 6-byte nop
/// 739 ns). Set at start-up from the kernel's features (features.rs).
static MULTIBYTE_NOPS: AtomicBool = AtomicBool::new(false);

pub fn set_multibyte_nops(on: bool) {
    MULTIBYTE_NOPS.store(on, Ordering::Relaxed);
}

/// Whether the kernel emulates this instruction instead of single-stepping it. Raw bytes, as the
/// kernel decides: push r64 (REX 0x41 only), jmp rel8/rel32, call rel32, jcc rel8/rel32, nop;
/// a 0x66 prefix is refused by the kernel, other prefixes are not accepted here either. With
/// `nops`, the multi-byte nops (`0f 1f /0`, also with one 0x66 prefix) too.
pub fn emulated(bytes: &[u8], nops: bool) -> bool {
    matches!(
        bytes,
        [0x50..=0x57]
            | [0x41, 0x50..=0x57]
            | [0x90]
            | [0xeb | 0x70..=0x7f, _]
            | [0xe9 | 0xe8, _, _, _, _]
            | [0x0f, 0x80..=0x8f, _, _, _, _]
    ) || (nops && matches!(bytes, [0x0f, 0x1f, ..] | [0x66, 0x0f, 0x1f, ..]))
}

/// Where the arguments the probe reads are: `held[n]` is the set of registers (bit i: register
/// i of `ARG_REGS`) that hold argument n's value at entry.
struct Held {
    held: [u8; 7],
    wanted: Vec<usize>,
    movable: bool,
}

impl Held {
    fn new(reads: Reads) -> Held {
        let mut held = [0u8; 7];
        let wanted: Vec<usize> = reads.args.iter().map(|&a| a as usize).filter(|&a| (1..=6).contains(&a)).collect();
        for &a in &wanted {
            held[a] = 1 << a;
        }
        Held { held, wanted, movable: reads.movable }
    }

    /// Applies `insn`; why passing it would lose an argument the probe reads, if it would.
    fn pass(&mut self, insn: &Instruction, written: &[Register]) -> Option<String> {
        // A register-to-register 64-bit mov copies: the destination then holds what the source
        // held.
        let copy = (self.movable
            && matches!(insn.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
            && insn.op0_kind() == OpKind::Register
            && insn.op1_kind() == OpKind::Register)
            .then(|| (insn.op0_register(), insn.op1_register()));
        let before = self.held;
        for r in written {
            let Some(i) = arg_index(*r) else { continue };
            for a in &self.wanted {
                self.held[*a] &= !(1 << i);
            }
            if let Some((dst, src)) = copy
                && dst.full_register() == r.full_register()
                && let Some(s) = arg_index(src)
            {
                for a in &self.wanted {
                    if before[*a] & (1 << s) != 0 {
                        self.held[*a] |= 1 << i;
                    }
                }
            }
        }
        let lost = self.wanted.iter().find(|&&a| self.held[a] == 0)?;
        let r = written.iter().find(|r| arg_index(**r).is_some_and(|i| before[*lost] & (1 << i) != 0));
        Some(format!("{insn} writes {:?}, which holds argument {lost}", r.copied().unwrap_or(Register::None)))
    }

    /// Where each argument is: its own register if it still holds it, else the lowest copy.
    fn args(&self) -> [u8; 7] {
        let mut out = [0, 1, 2, 3, 4, 5, 6];
        for &a in &self.wanted {
            let h = self.held[a];
            if h & (1 << a) == 0 && h != 0 {
                out[a] = h.trailing_zeros() as u8;
            }
        }
        out
    }
}

/// Why passing `insn` before the probe would be unsafe, if it would be; else the registers it
/// writes (full registers).
fn unsafe_to_pass(insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<Vec<Register>, String> {
    if insn.flow_control() != FlowControl::Next {
        return Err(format!("{insn} changes control flow"));
    }
    let info = info.info(insn);
    let writes = |a: OpAccess| {
        matches!(a, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
    };
    if info.used_memory().iter().any(|m| writes(m.access())) {
        return Err(format!("{insn} writes memory"));
    }
    let written: Vec<Register> =
        info.used_registers().iter().filter(|r| writes(r.access())).map(|r| r.register().full_register()).collect();
    if let Some(r) = written.iter().find(|r| ALWAYS_READ.contains(r)) {
        return Err(format!("{insn} writes {r:?}, which the probe reads"));
    }
    Ok(written)
}

/// The placement of the entry probe of a function whose code starts with `code` (at most the
/// function's length), for a probe that reads `reads`.
pub fn place(code: &[u8], reads: Reads) -> Placement {
    place_with(code, reads, MULTIBYTE_NOPS.load(Ordering::Relaxed))
}

/// [`place`], with the multi-byte nops taken as emulated or not.
fn place_with(code: &[u8], reads: Reads, nops: bool) -> Placement {
    let mut decoder = Decoder::new(64, code, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut first: Option<String> = None;
    let mut offset = 0usize;
    let mut held = Held::new(reads);
    for _ in 0..MAX_INSNS {
        if !decoder.can_decode() {
            break;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        let len = insn.len();
        let text = insn.to_string();
        if first.is_none() {
            first = Some(text.clone());
        }
        if emulated(&code[offset..offset + len], nops) {
            return Placement { delta: offset as u64, insn: text, note: None, args: held.args() };
        }
        let why =
            unsafe_to_pass(&insn, &mut factory).and_then(|written| held.pass(&insn, &written).map_or(Ok(()), Err));
        if let Err(why) = why {
            return entry(first, format!("no emulated instruction before {why}"));
        }
        offset += len;
    }
    entry(first, format!("no emulated instruction in the first {MAX_INSNS} safe ones"))
}

fn entry(first: Option<String>, note: String) -> Placement {
    Placement { delta: 0, insn: first.unwrap_or_default(), note: Some(note), args: [0, 1, 2, 3, 4, 5, 6] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_is_probed_on_its_je() {
        // test %rdi,%rdi; je +0xc2; push %rbp
        let p = place(&[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55], Reads::ALL);
        assert_eq!(p.delta, 3, "{p:?}");
        assert!(p.note.is_none());
    }

    #[test]
    fn a_push_at_the_entry_stays_there() {
        // push %r12; push %rbp
        assert_eq!(place(&[0x41, 0x54, 0x55], Reads::ALL).delta, 0);
    }

    #[test]
    fn endbr64_and_a_compare_are_passed() {
        // endbr64; cmpb $0x0,0x141b46(%rip); push %r12
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x80, 0x3d, 0x46, 0x1b, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(place(&code, Reads::ALL).delta, 11);
    }

    #[test]
    fn writing_an_argument_register_keeps_the_entry() {
        // mov %rsi,%rax; mul %rdx; mov %rax,%rsi; jo ...  (glibc's reallocarray)
        let p = place(&[0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05], Reads::ALL);
        assert_eq!(p.delta, 0);
        assert!(p.note.as_deref().unwrap_or("").contains("writes"), "{p:?}");
    }

    #[test]
    fn a_scratch_register_write_is_passed() {
        // mov %ecx,%r10d; test $0xfff,%r9d; jne ... (glibc's mmap): r10 is not read by the probe
        let code = [0x41, 0x89, 0xca, 0x41, 0xf7, 0xc1, 0xff, 0x0f, 0x00, 0x00, 0x75, 0x14];
        assert_eq!(place(&code, Reads::ALL).delta, 10);
    }

    #[test]
    fn stack_moves_and_syscalls_stop_the_search() {
        // sub $0x58,%rsp; push %rbx
        assert_eq!(place(&[0x48, 0x83, 0xec, 0x58, 0x53], Reads::ALL).delta, 0);
        // mov $0xb,%eax; syscall; ...
        assert_eq!(place(&[0xb8, 0x0b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x90], Reads::ALL).delta, 0);
        // mov %rdi,(%rsp); push %rbx: writes memory
        assert_eq!(place(&[0x48, 0x89, 0x3c, 0x24, 0x53], Reads::ALL).delta, 0);
    }

    #[test]
    fn only_the_arguments_read_count_and_copies_are_followed() {
        // A copy to rax: mimalloc's mi_heap_mallocn: mov %rsi,%rax; mov %rdx,%rsi; ... jo.
        let code = [0x48, 0x89, 0xf0, 0x48, 0x89, 0xd6, 0x70, 0x05];
        let p = place(&code, Reads { args: &[2, 3], movable: true });
        assert_eq!((p.delta, p.args[2], p.args[3]), (6, 7, 3), "{p:?}");
        // mimalloc's malloc: mov 0xb449(%rip),%rax; mov %rdi,%rsi; mov %fs:(%rax),%rdi;
        // cmp $0x400,%rsi; ja ...: the size moved to rsi before rdi was overwritten.
        let code = [
            0x48, 0x8b, 0x05, 0x49, 0xb4, 0x00, 0x00, 0x48, 0x89, 0xfe, 0x64, 0x48, 0x8b, 0x38, 0x48, 0x81, 0xfe, 0x00,
            0x04, 0x00, 0x00, 0x77, 0x29,
        ];
        let malloc = Reads { args: &[1], movable: true };
        let p = place(&code, malloc);
        assert_eq!((p.delta, p.args[1]), (21, 2), "{p:?}");
        // Read at fixed registers (mmap's), the same code keeps the probe at the entry.
        assert_eq!(place(&code, Reads { args: &[1], movable: false }).delta, 0);
        // jemalloc's free: mov %rdi,%rax; mov 0xa530e(%rip),%rdx; mov %rdi,%rcx; ... jne: free
        // reads rdi only, which stays.
        let free = [
            0x48, 0x89, 0xf8, 0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, 0x48, 0x89, 0xf9, 0x48, 0xc1, 0xe8, 0x1a, 0x0f,
            0x85, 0x00, 0x01, 0x00, 0x00,
        ];
        let p = place(&free, Reads { args: &[1], movable: true });
        assert_eq!((p.delta, p.args[1]), (17, 1), "{p:?}");
        assert_eq!(place(&free, Reads::ALL).delta, 0, "rdx is written: every argument counts");
        // An argument overwritten without a copy: the entry.
        let lost = [0x48, 0x89, 0xf7, 0x53]; // mov %rsi,%rdi; push %rbx
        assert_eq!(place(&lost, Reads { args: &[1], movable: true }).delta, 0);
    }

    #[test]
    fn the_kernels_emulated_set() {
        assert!(emulated(&[0x53], false) && emulated(&[0x41, 0x57], false) && emulated(&[0x90], false));
        assert!(emulated(&[0x74, 0x10], false) && emulated(&[0xeb, 0x10], false));
        assert!(
            emulated(&[0xe8, 1, 2, 3, 4], false)
                && emulated(&[0xe9, 1, 2, 3, 4], false)
                && emulated(&[0x0f, 0x84, 1, 2, 3, 4], false)
        );
        assert!(!emulated(&[0x66, 0x90], false), "0x66 prefix is refused by the kernel");
        assert!(!emulated(&[0x48, 0x50], false), "REX.W push is not emulated");
        assert!(!emulated(&[0xf3, 0x0f, 0x1e, 0xfa], false), "endbr64 is single-stepped");
        assert!(!emulated(&[0x48, 0x85, 0xff], false));
        // clang's patchable entry: single-stepped, unless the kernel emulates multi-byte nops.
        let patchable = [0x0f, 0x1f, 0x44, 0x00, 0x08, 0x41, 0x54, 0xc3];
        assert!(!emulated(&patchable[..5], false));
        assert_eq!(place_with(&patchable, Reads { args: &[1], movable: true }, false).delta, 5, "the push after it");
        assert!(emulated(&patchable[..5], true) && emulated(&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], true));
        assert_eq!(place_with(&patchable, Reads { args: &[1], movable: true }, true).delta, 0, "the nop itself");
    }
}
