//! A small reader for 64-bit little-endian ELF files: the file header, sections by name, program
//! headers, notes and the dynamic section's `DT_NEEDED` names. Just enough to check what the
//! FreeBSD cross build and the C header probe produced, without a dependency.
//!
//! Each test that includes this file uses a different part of it.
#![allow(dead_code)]

use std::ops::Range;

pub const ET_REL: u16 = 1;
pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;
pub const EM_X86_64: u16 = 62;
pub const ELFOSABI_NONE: u8 = 0;
pub const ELFOSABI_FREEBSD: u8 = 9;
pub const PT_DYNAMIC: u32 = 2;
pub const PT_INTERP: u32 = 3;
pub const PT_NOTE: u32 = 4;
pub const PT_LOAD: u32 = 1;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// A parsed ELF64 LSB file; every accessor checks its ranges and reports a bad file as `Err`.
pub struct Elf<'a> {
    bytes: &'a [u8],
    pub os_abi: u8,
    pub file_type: u16,
    pub machine: u16,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

pub struct ProgramHeader {
    pub kind: u32,
    pub offset: usize,
    pub vaddr: u64,
    pub filesz: usize,
}

pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

fn slice(bytes: &[u8], range: Range<usize>) -> Result<&[u8], String> {
    bytes.get(range.clone()).ok_or_else(|| {
        format!(
            "bytes {}..{} lie outside the file ({} bytes)",
            range.start,
            range.end,
            bytes.len()
        )
    })
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16, String> {
    Ok(u16::from_le_bytes(
        slice(bytes, at..at + 2)?.try_into().unwrap(),
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, String> {
    Ok(u32::from_le_bytes(
        slice(bytes, at..at + 4)?.try_into().unwrap(),
    ))
}

pub fn u64_at(bytes: &[u8], at: usize) -> Result<u64, String> {
    Ok(u64::from_le_bytes(
        slice(bytes, at..at + 8)?.try_into().unwrap(),
    ))
}

fn usize_at(bytes: &[u8], at: usize) -> Result<usize, String> {
    usize::try_from(u64_at(bytes, at)?).map_err(|e| e.to_string())
}

/// The NUL-terminated string starting at `at`.
fn c_str(bytes: &[u8], at: usize) -> Result<&[u8], String> {
    let rest = slice(bytes, at..bytes.len())?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or("unterminated string")?;
    Ok(&rest[..end])
}

impl<'a> Elf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        if slice(bytes, 0..4)? != b"\x7fELF" {
            return Err("not an ELF file".into());
        }
        if bytes[4] != 2 || bytes[5] != 1 {
            return Err(format!(
                "not a 64-bit little-endian ELF file (class {}, data {})",
                bytes[4], bytes[5]
            ));
        }
        Ok(Elf {
            bytes,
            os_abi: bytes[7],
            file_type: u16_at(bytes, 16)?,
            machine: u16_at(bytes, 18)?,
            phoff: usize_at(bytes, 32)?,
            shoff: usize_at(bytes, 40)?,
            phentsize: usize::from(u16_at(bytes, 54)?),
            phnum: usize::from(u16_at(bytes, 56)?),
            shentsize: usize::from(u16_at(bytes, 58)?),
            shnum: usize::from(u16_at(bytes, 60)?),
            shstrndx: usize::from(u16_at(bytes, 62)?),
        })
    }

    /// (name offset, file offset, size) of section `index`.
    fn section_header(&self, index: usize) -> Result<(usize, usize, usize), String> {
        let at = self.shoff + index * self.shentsize;
        Ok((
            u32_at(self.bytes, at)? as usize,
            usize_at(self.bytes, at + 24)?,
            usize_at(self.bytes, at + 32)?,
        ))
    }

    /// The contents of the section called `name`.
    pub fn section(&self, name: &str) -> Result<&'a [u8], String> {
        let (_, names_at, _) = self.section_header(self.shstrndx)?;
        for index in 0..self.shnum {
            let (name_at, offset, size) = self.section_header(index)?;
            if c_str(self.bytes, names_at + name_at)? == name.as_bytes() {
                return slice(self.bytes, offset..offset + size);
            }
        }
        Err(format!("no section {name}"))
    }

    pub fn program_headers(&self) -> Result<Vec<ProgramHeader>, String> {
        (0..self.phnum)
            .map(|index| {
                let at = self.phoff + index * self.phentsize;
                Ok(ProgramHeader {
                    kind: u32_at(self.bytes, at)?,
                    offset: usize_at(self.bytes, at + 8)?,
                    vaddr: u64_at(self.bytes, at + 16)?,
                    filesz: usize_at(self.bytes, at + 32)?,
                })
            })
            .collect()
    }

    pub fn segment(&self, header: &ProgramHeader) -> Result<&'a [u8], String> {
        slice(self.bytes, header.offset..header.offset + header.filesz)
    }

    /// The program interpreter named by `PT_INTERP`, if any.
    pub fn interpreter(&self) -> Result<Option<String>, String> {
        for header in self.program_headers()? {
            if header.kind == PT_INTERP {
                let path = c_str(self.segment(&header)?, 0)?;
                return Ok(Some(String::from_utf8_lossy(path).into_owned()));
            }
        }
        Ok(None)
    }

    /// Every note of every `PT_NOTE` segment.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, String> {
        let mut notes = Vec::new();
        for header in self.program_headers()? {
            if header.kind != PT_NOTE {
                continue;
            }
            let segment = self.segment(&header)?;
            let mut at = 0;
            while at + 12 <= segment.len() {
                let name_size = u32_at(segment, at)? as usize;
                let desc_size = u32_at(segment, at + 4)? as usize;
                let kind = u32_at(segment, at + 8)?;
                let name_at = at + 12;
                let desc_at = name_at + name_size.next_multiple_of(4);
                let name = slice(segment, name_at..name_at + name_size)?;
                notes.push(Note {
                    name: name.strip_suffix(b"\0").unwrap_or(name),
                    kind,
                    desc: slice(segment, desc_at..desc_at + desc_size)?,
                });
                at = desc_at + desc_size.next_multiple_of(4);
            }
        }
        Ok(notes)
    }

    /// File offset of a virtual address inside a `PT_LOAD` segment.
    fn file_offset(&self, vaddr: u64) -> Result<usize, String> {
        self.program_headers()?
            .iter()
            .filter(|header| header.kind == PT_LOAD)
            .find(|header| (header.vaddr..header.vaddr + header.filesz as u64).contains(&vaddr))
            .map(|header| header.offset + (vaddr - header.vaddr) as usize)
            .ok_or_else(|| format!("address {vaddr:#x} is in no loaded segment"))
    }

    /// The shared libraries the dynamic section asks for (`DT_NEEDED`), in order.
    pub fn needed_libraries(&self) -> Result<Vec<String>, String> {
        let Some(dynamic) = self
            .program_headers()?
            .into_iter()
            .find(|header| header.kind == PT_DYNAMIC)
        else {
            return Ok(Vec::new());
        };
        let entries = self.segment(&dynamic)?;
        let mut needed = Vec::new();
        let mut strtab = None;
        for entry in entries.chunks_exact(16) {
            let (tag, value) = (u64_at(entry, 0)?, u64_at(entry, 8)?);
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed.push(value as usize),
                DT_STRTAB => strtab = Some(self.file_offset(value)?),
                _ => {}
            }
        }
        let strtab = strtab.ok_or("dynamic section without DT_STRTAB")?;
        needed
            .into_iter()
            .map(|name_at| {
                let name = c_str(self.bytes, strtab + name_at)?;
                Ok(String::from_utf8_lossy(name).into_owned())
            })
            .collect()
    }
}
