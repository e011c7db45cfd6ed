//! Probe placement: where in a function its entry uprobe costs least.
//!
//! The x86 uprobe code emulates a few instructions in the kernel (push of a register, relative
//! jmp/call/jcc, nop) and single-steps every other one out of line, which costs a second trap:
//! about 10 us here against 0.55 us (docs/probe-placement.md). So the probe goes on the first
//! instruction the kernel emulates, provided every instruction before it is safe to pass: none
//! branches, writes memory, moves the stack, or writes a register the probe reads (arguments,
//! rsp, and the callee-saved registers the unwinder reads). Otherwise it stays at the entry.
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register};

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
}

/// Registers whose value the entry probe reads.
const READ_BY_PROBE: &[Register] = &[
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
    Register::RSP,
    Register::RBP,
    Register::RBX,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// Whether the kernel emulates this instruction instead of single-stepping it. Raw bytes, as the
/// kernel decides: push r64 (REX 0x41 only), jmp rel8/rel32, call rel32, jcc rel8/rel32, nop;
/// a 0x66 prefix is refused by the kernel, other prefixes are not accepted here either.
pub fn emulated(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [0x50..=0x57]
            | [0x41, 0x50..=0x57]
            | [0x90]
            | [0xeb | 0x70..=0x7f, _]
            | [0xe9 | 0xe8, _, _, _, _]
            | [0x0f, 0x80..=0x8f, _, _, _, _]
    )
}

/// Why passing `insn` before the probe would be unsafe, if it would be.
fn unsafe_to_pass(insn: &Instruction, info: &mut InstructionInfoFactory) -> Option<String> {
    if insn.flow_control() != FlowControl::Next {
        return Some(format!("{insn} changes control flow"));
    }
    let info = info.info(insn);
    let writes = |a: OpAccess| {
        matches!(a, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
    };
    if info.used_memory().iter().any(|m| writes(m.access())) {
        return Some(format!("{insn} writes memory"));
    }
    if let Some(r) = info
        .used_registers()
        .iter()
        .find(|r| writes(r.access()) && READ_BY_PROBE.contains(&r.register().full_register()))
    {
        return Some(format!("{insn} writes {:?}, which the probe reads", r.register()));
    }
    None
}

/// The placement of the entry probe of a function whose code starts with `code` (at most the
/// function's length).
pub fn place(code: &[u8]) -> Placement {
    let mut decoder = Decoder::new(64, code, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut first: Option<String> = None;
    let mut offset = 0usize;
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
        if emulated(&code[offset..offset + len]) {
            return Placement { delta: offset as u64, insn: text, note: None };
        }
        if let Some(why) = unsafe_to_pass(&insn, &mut factory) {
            return entry(first, format!("no emulated instruction before {why}"));
        }
        offset += len;
    }
    entry(first, format!("no emulated instruction in the first {MAX_INSNS} safe ones"))
}

fn entry(first: Option<String>, note: String) -> Placement {
    Placement { delta: 0, insn: first.unwrap_or_default(), note: Some(note) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_is_probed_on_its_je() {
        // test %rdi,%rdi; je +0xc2; push %rbp
        let p = place(&[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55]);
        assert_eq!(p.delta, 3, "{p:?}");
        assert!(p.note.is_none());
    }

    #[test]
    fn a_push_at_the_entry_stays_there() {
        // push %r12; push %rbp
        assert_eq!(place(&[0x41, 0x54, 0x55]).delta, 0);
    }

    #[test]
    fn endbr64_and_a_compare_are_passed() {
        // endbr64; cmpb $0x0,0x141b46(%rip); push %r12
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x80, 0x3d, 0x46, 0x1b, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(place(&code).delta, 11);
    }

    #[test]
    fn writing_an_argument_register_keeps_the_entry() {
        // mov %rsi,%rax; mul %rdx; mov %rax,%rsi; jo ...  (glibc's reallocarray)
        let p = place(&[0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05]);
        assert_eq!(p.delta, 0);
        assert!(p.note.as_deref().unwrap_or("").contains("writes"), "{p:?}");
    }

    #[test]
    fn a_scratch_register_write_is_passed() {
        // mov %ecx,%r10d; test $0xfff,%r9d; jne ... (glibc's mmap): r10 is not read by the probe
        let code = [0x41, 0x89, 0xca, 0x41, 0xf7, 0xc1, 0xff, 0x0f, 0x00, 0x00, 0x75, 0x14];
        assert_eq!(place(&code).delta, 10);
    }

    #[test]
    fn stack_moves_and_syscalls_stop_the_search() {
        // sub $0x58,%rsp; push %rbx
        assert_eq!(place(&[0x48, 0x83, 0xec, 0x58, 0x53]).delta, 0);
        // mov $0xb,%eax; syscall; ...
        assert_eq!(place(&[0xb8, 0x0b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x90]).delta, 0);
        // mov %rdi,(%rsp); push %rbx: writes memory
        assert_eq!(place(&[0x48, 0x89, 0x3c, 0x24, 0x53]).delta, 0);
    }

    #[test]
    fn the_kernels_emulated_set() {
        assert!(emulated(&[0x53]) && emulated(&[0x41, 0x57]) && emulated(&[0x90]));
        assert!(emulated(&[0x74, 0x10]) && emulated(&[0xeb, 0x10]));
        assert!(emulated(&[0xe8, 1, 2, 3, 4]) && emulated(&[0xe9, 1, 2, 3, 4]) && emulated(&[0x0f, 0x84, 1, 2, 3, 4]));
        assert!(!emulated(&[0x66, 0x90]), "0x66 prefix is refused by the kernel");
        assert!(!emulated(&[0x48, 0x50]), "REX.W push is not emulated");
        assert!(!emulated(&[0xf3, 0x0f, 0x1e, 0xfa]), "endbr64 is single-stepped");
        assert!(!emulated(&[0x48, 0x85, 0xff]));
    }
}
