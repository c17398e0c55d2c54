//! The guest rewrite that puts a wasm task's disk limit in front of WASI: done once per
//! module, before it is compiled (the compiled module is what the caches keep), pure
//! (bytes in, bytes out, no I/O).
//!
//! Why a rewrite: wasmtime-wasi 48 keeps its preview 1 implementation private, and its
//! host functions find the guest's memory through the `memory` export of their caller.
//! A host function that charges the quota and then calls wasmtime-wasi's own
//! `fd_write` (`Func::call`) is a host-to-host call with no such export, which traps.
//! So the call stays in the guest: each import that grows a sandbox (`fd_write`,
//! `fd_pwrite`, `path_open`, `path_create_directory`, `path_symlink`, `path_link`)
//! gets a wrapper function, defined in the guest module, that first calls a host
//! import of ours (module [`DISK_MODULE`]; it reads the guest's memory through its
//! caller, charges the task's `DiskQuota` and returns a WASI errno) and returns that
//! errno when it is not 0, else calls the original import with the same arguments.
//! `fd_close` and `fd_renumber` get the same wrapper around a host call that notes a
//! standard stream being replaced (after which writes to fds 0-2 are charged too).
//!
//! Every reference to a wrapped import is redirected to its wrapper: `call`,
//! `return_call`, `ref.func`, element segments (so `call_indirect` through a table),
//! global initialisers, exports and the start function. New imports go after the
//! module's own, so every defined function moves up by their number; the name section
//! is renumbered the same way (imports keep their names). DWARF (`.debug_*`) and code
//! metadata sections, whose code offsets re-encoding would make wrong, are dropped.
//!
//! A module that imports none of these calls is returned as it came, byte for byte.

use std::borrow::Cow;
use std::convert::Infallible;

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{
    BlockType, CodeSection, EntityType, Function, FunctionSection, ImportSection, Instruction,
    SectionId, TypeSection, ValType,
};
use wasmparser::{Parser, Payload, TypeRef, ValType as PValType};

/// The module name of the host functions the wrappers call. A guest may not import
/// from it itself.
pub(crate) const DISK_MODULE: &str = "agora_disk";
const WASI: &str = "wasi_snapshot_preview1";

/// Bumped whenever the rewrite's output changes: it is part of the compiled-module
/// cache's key, so a module compiled by an older rewrite (or before there was one) is
/// never taken from the cache.
pub(crate) const REWRITE_VERSION: u32 = 1;

/// The host functions the wrappers call (all `(i32 ...) -> i32 errno`).
pub(crate) mod charge {
    /// `(fd, iovs, iovs_len)`: the bytes a write names.
    pub const WRITE: &str = "charge_write";
    /// `(oflags)`: a file, when `path_open` may create one.
    pub const OPEN: &str = "charge_open";
    /// `()`: one entry (a directory, a symlink, a hard link).
    pub const CREATE: &str = "charge_create";
    /// `(fd)`: fd is closed or replaced (`fd_close`, `fd_renumber`'s target).
    pub const RELEASE_FD: &str = "release_fd";
}

/// One WASI import that gets a wrapper.
struct Hook {
    name: &'static str,
    /// Its parameters (every WASI preview 1 function returns an `i32` errno).
    params: &'static [PValType],
    /// The host function called first.
    charge: &'static str,
    /// Which of its parameters (all `i32`) are passed on to `charge`.
    pass: &'static [u32],
}

const I32: PValType = PValType::I32;
const I64: PValType = PValType::I64;

const HOOKS: &[Hook] = &[
    Hook {
        name: "fd_write",
        params: &[I32, I32, I32, I32],
        charge: charge::WRITE,
        pass: &[0, 1, 2],
    },
    Hook {
        name: "fd_pwrite",
        params: &[I32, I32, I32, I64, I32],
        charge: charge::WRITE,
        pass: &[0, 1, 2],
    },
    Hook {
        name: "path_open",
        params: &[I32, I32, I32, I32, I32, I64, I64, I32, I32],
        charge: charge::OPEN,
        pass: &[4],
    },
    Hook {
        name: "path_create_directory",
        params: &[I32, I32, I32],
        charge: charge::CREATE,
        pass: &[],
    },
    Hook {
        name: "path_symlink",
        params: &[I32, I32, I32, I32, I32],
        charge: charge::CREATE,
        pass: &[],
    },
    Hook {
        name: "path_link",
        params: &[I32, I32, I32, I32, I32, I32, I32],
        charge: charge::CREATE,
        pass: &[],
    },
    Hook {
        name: "fd_close",
        params: &[I32],
        charge: charge::RELEASE_FD,
        pass: &[0],
    },
    Hook {
        name: "fd_renumber",
        params: &[I32, I32],
        charge: charge::RELEASE_FD,
        pass: &[1],
    },
];

/// Each wrapped WASI call's name and parameters, and the host function its wrapper
/// calls with how many parameters (for the test that holds these to the linker's).
#[cfg(test)]
pub(crate) fn hooks(
) -> impl Iterator<Item = (&'static str, &'static [PValType], &'static str, usize)> {
    HOOKS
        .iter()
        .map(|h| (h.name, h.params, h.charge, h.pass.len()))
}

/// Why a module could not be rewritten: a sentence for the task's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RewriteError(pub(crate) String);

impl std::fmt::Display for RewriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `module` with its sandbox-growing WASI imports wrapped (see the module's doc), or
/// `module` itself when it imports none of them.
pub(crate) fn rewrite(module: &[u8]) -> Result<Cow<'_, [u8]>, RewriteError> {
    // wasm-encoder's re-encoder has `unreachable!`s for operators it does not know; a
    // module we cannot rewrite must be refused with a reason, never take the executor
    // down. The rewrite only reads `module` and builds fresh values, so nothing is
    // left half-changed by an unwind.
    match std::panic::catch_unwind(|| rewrite_inner(module)) {
        Ok(result) => result,
        Err(_) => Err(RewriteError(
            "the disk limit's rewrite of the module failed (a construct it does not handle)"
                .to_string(),
        )),
    }
}

fn rewrite_inner(module: &[u8]) -> Result<Cow<'_, [u8]>, RewriteError> {
    let plan = scan(module)?;
    if plan.hooked.is_empty() {
        return Ok(Cow::Borrowed(module));
    }
    let mut rewriter = Rewriter {
        plan,
        wrote_functions: false,
        wrote_code: false,
    };
    let mut out = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut out, Parser::new(0), module)
        .map_err(|e| {
            RewriteError(format!(
                "the disk limit's rewrite of the module failed: {e}"
            ))
        })?;
    Ok(Cow::Owned(out.finish()))
}

/// What the rewrite will do, read from the module's type, import and function sections.
struct Plan {
    /// Types the module defines: the charge functions' types go after them.
    types: u32,
    /// Function imports (the first indices of the function index space).
    imported: u32,
    /// Functions the module defines.
    defined: u32,
    /// The imports that get wrappers, in index order.
    hooked: Vec<Hooked>,
    /// The host functions imported, in the order they are added.
    charges: Vec<(&'static str, usize)>,
}

struct Hooked {
    /// Its index in the function index space.
    import: u32,
    /// Its type index (the wrapper's type too).
    ty: u32,
    hook: &'static Hook,
}

impl Plan {
    /// Functions this rewrite imports: every defined function moves up by this.
    fn added_imports(&self) -> u32 {
        self.charges.len() as u32
    }

    #[allow(
        clippy::expect_used,
        reason = "plan() imports the charge of every hooked call, and only those ask"
    )]
    fn charge_index(&self, name: &str) -> u32 {
        let at = self
            .charges
            .iter()
            .position(|(c, _)| *c == name)
            .expect("every hooked call's charge is imported");
        self.imported + at as u32
    }

    fn wrapper_index(&self, nth: usize) -> u32 {
        self.imported + self.added_imports() + self.defined + nth as u32
    }
}

fn scan(module: &[u8]) -> Result<Plan, RewriteError> {
    let bad = |e: wasmparser::BinaryReaderError| {
        RewriteError(format!("the module cannot be read for its disk limit: {e}"))
    };
    // Function types by type index (None: another kind of type).
    let mut types: Vec<Option<wasmparser::FuncType>> = Vec::new();
    let mut imported = 0u32;
    let mut defined = 0u32;
    let mut hooked = Vec::new();
    for payload in Parser::new(0).parse_all(module) {
        match payload.map_err(bad)? {
            Payload::TypeSection(section) => {
                for group in section {
                    for sub in group.map_err(bad)?.types() {
                        types.push(match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => Some(f.clone()),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.map_err(bad)?;
                    if import.module == DISK_MODULE {
                        return Err(RewriteError(format!(
                            "module imports {}::{}; the module name {DISK_MODULE} is Agora's own",
                            import.module, import.name
                        )));
                    }
                    let (TypeRef::Func(ty) | TypeRef::FuncExact(ty)) = import.ty else {
                        continue;
                    };
                    let index = imported;
                    imported += 1;
                    if import.module != WASI {
                        continue;
                    }
                    let Some(hook) = HOOKS.iter().find(|h| h.name == import.name) else {
                        continue;
                    };
                    let expected = |f: &wasmparser::FuncType| {
                        f.params() == hook.params && f.results() == [I32]
                    };
                    match types.get(ty as usize) {
                        Some(Some(f)) if expected(f) => {}
                        _ => {
                            return Err(RewriteError(format!(
                                "module imports {WASI}::{} with a type other than WASI's",
                                hook.name
                            )))
                        }
                    }
                    hooked.push(Hooked {
                        import: index,
                        ty,
                        hook,
                    });
                }
            }
            Payload::FunctionSection(section) => defined = section.count(),
            // Everything needed comes before the code; stop reading there.
            Payload::CodeSectionStart { .. } | Payload::DataSection(_) | Payload::End(_) => break,
            _ => {}
        }
    }
    let types = u32::try_from(types.len()).map_err(|_| RewriteError("too many types".into()))?;
    let mut charges: Vec<(&'static str, usize)> = Vec::new();
    for h in &hooked {
        if !charges.iter().any(|(c, _)| *c == h.hook.charge) {
            charges.push((h.hook.charge, h.hook.pass.len()));
        }
    }
    Ok(Plan {
        types,
        imported,
        defined,
        hooked,
        charges,
    })
}

struct Rewriter {
    plan: Plan,
    wrote_functions: bool,
    wrote_code: bool,
}

impl Rewriter {
    /// A function index in the rewritten module, for a reference to `func`: wrapped
    /// imports become their wrappers, defined functions move past the new imports.
    fn reference(&self, func: u32) -> u32 {
        if func >= self.plan.imported {
            return func + self.plan.added_imports();
        }
        match self.plan.hooked.iter().position(|h| h.import == func) {
            Some(nth) => self.plan.wrapper_index(nth),
            None => func,
        }
    }

    /// The index a name in the name section moves to: an import keeps its own (it is
    /// still there), defined functions move past the new imports.
    fn named(&self, func: u32) -> u32 {
        if func >= self.plan.imported {
            func + self.plan.added_imports()
        } else {
            func
        }
    }

    fn add_wrapper_types(&mut self, functions: &mut FunctionSection) {
        for h in &self.plan.hooked {
            functions.function(h.ty);
        }
        self.wrote_functions = true;
    }

    fn add_wrapper_bodies(&mut self, code: &mut CodeSection) {
        for h in &self.plan.hooked {
            let params = h.hook.params.len() as u32;
            // One local after the parameters: the charge's errno.
            let errno = params;
            let mut f = Function::new([(1, ValType::I32)]);
            for &p in h.hook.pass {
                f.instruction(&Instruction::LocalGet(p));
            }
            f.instruction(&Instruction::Call(self.plan.charge_index(h.hook.charge)))
                .instruction(&Instruction::LocalTee(errno))
                .instruction(&Instruction::If(BlockType::Empty))
                .instruction(&Instruction::LocalGet(errno))
                .instruction(&Instruction::Return)
                .instruction(&Instruction::End);
            for p in 0..params {
                f.instruction(&Instruction::LocalGet(p));
            }
            f.instruction(&Instruction::Call(h.import))
                .instruction(&Instruction::End);
            code.function(&f);
        }
        self.wrote_code = true;
    }
}

/// Where a section goes in a module (the binary format's order, which is not the
/// order of the ids); None comes first as `after` and last as `before`.
fn rank(id: SectionId) -> u8 {
    match id {
        SectionId::Custom => 0,
        SectionId::Type => 1,
        SectionId::Import => 2,
        SectionId::Function => 3,
        SectionId::Table => 4,
        SectionId::Memory => 5,
        SectionId::Tag => 6,
        SectionId::Global => 7,
        SectionId::Export => 8,
        SectionId::Start => 9,
        SectionId::Element => 10,
        SectionId::DataCount => 11,
        SectionId::Code => 12,
        SectionId::Data => 13,
    }
}

impl Reencode for Rewriter {
    type Error = Infallible;

    fn function_index(&mut self, func: u32) -> Result<u32, reencode::Error<Infallible>> {
        Ok(self.reference(func))
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        reencode::utils::parse_type_section(self, types, section)?;
        // One type per charge function, in the order of `plan.charges`.
        for (_, params) in &self.plan.charges {
            types
                .ty()
                .function(vec![ValType::I32; *params], [ValType::I32]);
        }
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        reencode::utils::parse_import_section(self, imports, section)?;
        for (i, (name, _)) in self.plan.charges.iter().enumerate() {
            imports.import(
                DISK_MODULE,
                name,
                EntityType::Function(self.plan.types + i as u32),
            );
        }
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        reencode::utils::parse_function_section(self, functions, section)?;
        self.add_wrapper_types(functions);
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        reencode::utils::parse_code_section(self, code, section)?;
        self.add_wrapper_bodies(code);
        Ok(())
    }

    /// A module that defines no function has no function or code section: add them
    /// where they belong.
    fn intersperse_section_hook(
        &mut self,
        module: &mut wasm_encoder::Module,
        after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> Result<(), reencode::Error<Infallible>> {
        let after = after.map_or(0, rank);
        let before = before.map_or(u8::MAX, rank);
        let here = |id| after < rank(id) && rank(id) < before;
        if !self.wrote_functions && here(SectionId::Function) {
            let mut functions = FunctionSection::new();
            self.add_wrapper_types(&mut functions);
            module.section(&functions);
        }
        if !self.wrote_code && here(SectionId::Code) {
            let mut code = CodeSection::new();
            self.add_wrapper_bodies(&mut code);
            module.section(&code);
        }
        Ok(())
    }

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        match section.as_known() {
            // Names are for backtraces only: one that cannot be renumbered is dropped
            // rather than refusing the module.
            wasmparser::KnownCustom::Name(names) => match self.custom_name_section(names) {
                Ok(names) => {
                    module.section(&names);
                }
                Err(e) => tracing::debug!(error = %e, "dropped a name section it cannot renumber"),
            },
            // DWARF and code metadata (branch hints) point at offsets in the code, which
            // re-encoding moves: wrong, they would mislead; dropped. (wasmtime reads
            // neither by default.)
            _ if section.name().starts_with(".debug_")
                || section.name().starts_with("metadata.code.") =>
            {
                tracing::debug!(
                    section = section.name(),
                    "dropped a custom section the rewrite would make wrong"
                );
            }
            _ => {
                module.section(&self.custom_section(section)?);
            }
        }
        Ok(())
    }

    fn parse_custom_name_subsection(
        &mut self,
        names: &mut wasm_encoder::NameSection,
        section: wasmparser::Name<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        use reencode::utils::{indirect_name_map, name_map};
        match section {
            wasmparser::Name::Function(map) => {
                names.functions(&name_map(map, |i| Ok(self.named(i)))?);
            }
            wasmparser::Name::Local(map) => {
                names.locals(&indirect_name_map(map, |i| Ok(self.named(i)))?);
            }
            wasmparser::Name::Label(map) => {
                names.labels(&indirect_name_map(map, |i| Ok(self.named(i)))?);
            }
            other => reencode::utils::parse_custom_name_subsection(self, names, other)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("valid wat")
    }

    /// A module's imports, exports, element items and, per function, its calls and
    /// `ref.func`s: enough to check the plumbing without a printer.
    fn outline(bytes: &[u8]) -> String {
        let mut out = String::new();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.unwrap() {
                Payload::ImportSection(s) => {
                    for i in s.into_imports() {
                        let i = i.unwrap();
                        out += &format!("import {}::{}\n", i.module, i.name);
                    }
                }
                Payload::ExportSection(s) => {
                    for e in s {
                        let e = e.unwrap();
                        out += &format!("export {} {}\n", e.name, e.index);
                    }
                }
                Payload::ElementSection(s) => {
                    for e in s {
                        if let wasmparser::ElementItems::Functions(f) = e.unwrap().items {
                            let f: Vec<u32> = f.into_iter().map(|f| f.unwrap()).collect();
                            out += &format!("elem {f:?}\n");
                        }
                    }
                }
                Payload::CodeSectionEntry(body) => {
                    let mut calls = Vec::new();
                    let mut ops = body.get_operators_reader().unwrap();
                    while !ops.eof() {
                        match ops.read().unwrap() {
                            wasmparser::Operator::Call { function_index } => {
                                calls.push(format!("call {function_index}"))
                            }
                            wasmparser::Operator::RefFunc { function_index } => {
                                calls.push(format!("ref.func {function_index}"))
                            }
                            _ => {}
                        }
                    }
                    out += &format!("func [{}]\n", calls.join(", "));
                }
                _ => {}
            }
        }
        out
    }

    fn validate(bytes: &[u8]) {
        wasmparser::Validator::new()
            .validate_all(bytes)
            .expect("the rewritten module is valid");
    }

    #[test]
    fn a_module_without_growing_calls_is_left_as_it_came() {
        let m = wat(r#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
            (import "wasi_snapshot_preview1" "fd_read" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start") (call 0 (i32.const 0))))"#);
        let out = rewrite(&m).unwrap();
        assert!(matches!(out, Cow::Borrowed(_)));
        assert_eq!(&*out, &m[..]);
    }

    #[test]
    fn every_reference_to_a_wrapped_import_goes_to_its_wrapper() {
        let m = wat(r#"(module
            (type $w (func (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (import "wasi_snapshot_preview1" "fd_write" (func $write (type $w)))
            (memory (export "memory") 1)
            (table 2 funcref)
            (elem (i32.const 0) func $write $start)
            (global funcref (ref.func $write))
            (func $start (export "_start")
                (drop (call $write (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 0)))
                (drop (call_indirect (type $w) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
                (call $exit (i32.const 0)))
            (export "write" (func $write)))"#);
        let out = rewrite(&m).unwrap();
        validate(&out);
        // Imports 0 (exit), 1 (fd_write), 2 (charge_write); $start moves 2 -> 3; the
        // wrapper is 4.
        assert_eq!(
            outline(&out),
            "import wasi_snapshot_preview1::proc_exit\n\
             import wasi_snapshot_preview1::fd_write\n\
             import agora_disk::charge_write\n\
             export memory 0\n\
             export _start 3\n\
             export write 4\n\
             elem [4, 3]\n\
             func [call 4, call 0]\n\
             func [call 2, call 1]\n"
        );
    }

    #[test]
    fn a_module_defining_no_function_gets_function_and_code_sections() {
        // `_start` is the import itself, re-exported.
        let m = wat(r#"(module
            (import "wasi_snapshot_preview1" "path_create_directory"
                (func $mkdir (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (export "mkdir" (func $mkdir)))"#);
        let out = rewrite(&m).unwrap();
        validate(&out);
        assert_eq!(
            outline(&out),
            "import wasi_snapshot_preview1::path_create_directory\n\
             import agora_disk::charge_create\n\
             export memory 0\n\
             export mkdir 2\n\
             func [call 1, call 0]\n"
        );
    }

    #[test]
    fn names_follow_their_functions_and_dwarf_is_dropped() {
        let m = wat(r#"(module
            (@custom ".debug_info" "offsets")
            (@custom "producers" "kept")
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func $main (export "_start") (local $x i32)))"#);
        let out = rewrite(&m).unwrap();
        validate(&out);
        let mut names = Vec::new();
        let mut customs = Vec::new();
        for p in Parser::new(0).parse_all(&out) {
            if let Payload::CustomSection(c) = p.unwrap() {
                customs.push(c.name().to_string());
                if let wasmparser::KnownCustom::Name(r) = c.as_known() {
                    for n in r {
                        if let wasmparser::Name::Function(map) = n.unwrap() {
                            for n in map {
                                let n = n.unwrap();
                                names.push((n.index, n.name.to_string()));
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(
            names,
            [(0, "fd_write".to_string()), (2, "main".to_string())]
        );
        assert_eq!(customs, ["producers", "name"]);
    }

    #[test]
    fn agoras_own_module_name_and_a_wrong_wasi_type_are_refused() {
        let own = wat(
            r#"(module (import "agora_disk" "charge_write" (func (param i32 i32 i32) (result i32))))"#,
        );
        assert_eq!(
            rewrite(&own).unwrap_err().0,
            "module imports agora_disk::charge_write; the module name agora_disk is Agora's own"
        );
        let wrong =
            wat(r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32))))"#);
        assert_eq!(
            rewrite(&wrong).unwrap_err().0,
            "module imports wasi_snapshot_preview1::fd_write with a type other than WASI's"
        );
        assert!(rewrite(b"\0asm\x01\0\0\0\x02\x05")
            .unwrap_err()
            .0
            .starts_with("the module cannot be read for its disk limit"));
    }
}
