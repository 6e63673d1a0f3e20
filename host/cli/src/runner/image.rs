//! Recognises and loads raw guest images: ELF64 executables at their
//! physical addresses (started in long mode, or, when they carry a PVH
//! entry note, in 32-bit protected mode at that entry), anything else as a
//! flat real-mode binary at 0x1000.

use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{Elf, KernelLoader};
use msrwasm::tools::ReadError;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{ELF_MIN_ADDR, FLAT_LOAD_ADDR};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// Linux boot protocol magic "HdrS" at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// The built-in PVH guest (`host/cli/guests/pvh.pvh.S`, written by
/// `msrwasm guests`): prints MSR 0x35 (a plugin's) and 0x1b (KVM's), then
/// powers off.
pub const PVH_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pvh.elf"));
/// The built-in PVH reload guest (`host/cli/guests/pvh_reload.pvh.S`):
/// reads MSR 0x35 until its value changes, prints both, then powers off.
pub const PVH_RELOAD_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pvh_reload.elf"));

/// Why a guest image cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest image {} is a directory, not a file", path.display())]
    Directory { path: PathBuf },
    #[error("guest image {} is a {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("guest image {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("guest image {} ({size} bytes) does not fit in guest memory ({mem} bytes); raise --mem", path.display())]
    TooLarge { path: PathBuf, size: u64, mem: u64 },
    #[error("guest image {} is a Linux bzImage; booting Linux kernels is not supported yet", path.display())]
    BzImage { path: PathBuf },
    #[error("guest image {}: not a usable ELF executable: {reason}", path.display())]
    BadElf { path: PathBuf, reason: String },
}

/// A loaded image: where its vCPUs start and in which mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadedImage {
    /// 64-bit long mode at `entry`; `segments` are the `[start, end)` ranges
    /// the image occupies, which the host's stacks must stay clear of.
    Elf { entry: u64, segments: Vec<(u64, u64)> },
    /// An ELF with a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit
    /// protected mode, paging off, at `entry` (the note's address, not
    /// `e_entry`); `segments` as for `Elf`.
    Pvh { entry: u64, segments: Vec<(u64, u64)> },
    /// Real mode at 0x1000.
    Flat { len: u64 },
}

/// Loads the image at `path` into `mem` (of `mem_size` bytes).
pub fn load(path: &Path, mem: &GuestMemoryMmap, mem_size: u64) -> Result<LoadedImage, ImageError> {
    let open_err = |source| ImageError::Open {
        path: path.to_owned(),
        source,
    };
    // Opened without blocking and checked after opening: a FIFO, a device
    // or a directory is refused, never waited on or read without end.
    let (mut file, size) = match msrwasm::tools::open_regular(path, mem_size) {
        Ok(opened) => opened,
        Err(ReadError::NotRegular("directory")) => return Err(ImageError::Directory { path: path.to_owned() }),
        Err(ReadError::NotRegular(kind)) => {
            return Err(ImageError::NotRegular {
                path: path.to_owned(),
                kind,
            });
        }
        Err(ReadError::TooLarge { size, .. }) => {
            return Err(ImageError::TooLarge {
                path: path.to_owned(),
                size,
                mem: mem_size,
            });
        }
        Err(ReadError::Io(e)) => return Err(open_err(e)),
    };
    if size == 0 {
        return Err(ImageError::Empty { path: path.to_owned() });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    (&mut file)
        .take(mem_size + 1)
        .read_to_end(&mut bytes)
        .map_err(open_err)?;
    if bytes.len() as u64 != size {
        return Err(open_err(std::io::Error::other(
            "the file changed size while it was read",
        )));
    }

    if bytes.starts_with(ELF_MAGIC) {
        let plan = plan_elf(&bytes, mem_size).map_err(|reason| ImageError::BadElf {
            path: path.to_owned(),
            reason,
        })?;
        let loaded =
            Elf::load(mem, None, &mut file, Some(GuestAddress(ELF_MIN_ADDR))).map_err(|e| ImageError::BadElf {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        return pvh_plan(plan, &loaded.pvh_boot_cap).map_err(|reason| ImageError::BadElf {
            path: path.to_owned(),
            reason,
        });
    }
    if bytes.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        return Err(ImageError::BzImage { path: path.to_owned() });
    }
    if FLAT_LOAD_ADDR + size > mem_size {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            size: size + FLAT_LOAD_ADDR,
            mem: mem_size,
        });
    }
    mem.write_slice(&bytes, GuestAddress(FLAT_LOAD_ADDR))
        .map_err(|e| ImageError::BadElf {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(LoadedImage::Flat { len: size })
}

/// Checks an ELF image against the conventions before anything is copied,
/// so that every refusal names the rule it breaks.
fn plan_elf(bytes: &[u8], mem_size: u64) -> Result<LoadedImage, String> {
    let ehdr_len = std::mem::size_of::<Elf64_Ehdr>();
    let ehdr = bytes
        .get(..ehdr_len)
        .and_then(Elf64_Ehdr::from_slice)
        .ok_or("truncated ELF header")?;
    if ehdr.e_ident[4] != ELFCLASS64 {
        return Err("not a 64-bit ELF (ELFCLASS64 required)".into());
    }
    if ehdr.e_ident[5] != ELFDATA2LSB {
        return Err("not little-endian".into());
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(format!("machine {} is not x86-64", ehdr.e_machine));
    }
    if ehdr.e_type != ET_EXEC {
        return Err(format!("type {} is not ET_EXEC (a static executable)", ehdr.e_type));
    }
    let phdr_len = std::mem::size_of::<Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != phdr_len {
        return Err(format!("program header size {} is not {phdr_len}", ehdr.e_phentsize));
    }
    let mut segments = Vec::new();
    for i in 0..u64::from(ehdr.e_phnum) {
        let at = ehdr
            .e_phoff
            .checked_add(i * phdr_len as u64)
            .ok_or("program header offset overflows")?;
        let phdr = usize::try_from(at)
            .ok()
            .and_then(|at| bytes.get(at..at + phdr_len))
            .and_then(Elf64_Phdr::from_slice)
            .ok_or_else(|| format!("program header {i} lies outside the file"))?;
        if phdr.p_type != PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        let start = phdr.p_paddr;
        let end = start
            .checked_add(phdr.p_memsz)
            .ok_or_else(|| format!("segment {i} wraps around"))?;
        if phdr.p_filesz > phdr.p_memsz || phdr.p_offset.saturating_add(phdr.p_filesz) > bytes.len() as u64 {
            return Err(format!("segment {i} refers to bytes outside the file"));
        }
        if start < ELF_MIN_ADDR {
            return Err(format!(
                "segment {i} at {start:#x} lies below 1 MiB ({ELF_MIN_ADDR:#x})"
            ));
        }
        if end > mem_size {
            return Err(format!(
                "segment {i} [{start:#x}, {end:#x}) lies outside guest memory ({mem_size:#x} bytes); raise --mem"
            ));
        }
        segments.push((start, end));
    }
    if segments.is_empty() {
        return Err("no loadable segment".into());
    }
    // `e_entry` is checked by `pvh_plan`: a PVH guest does not use it.
    Ok(LoadedImage::Elf {
        entry: ehdr.e_entry,
        segments,
    })
}

/// An ELF whose PT_NOTE segment carries a PVH entry becomes a PVH guest
/// started there (its `e_entry` is not used); otherwise it starts at
/// `e_entry`. The entry used must lie inside a loaded segment.
fn pvh_plan(plan: LoadedImage, pvh: &PvhBootCapability) -> Result<LoadedImage, String> {
    match (plan, pvh) {
        (LoadedImage::Elf { segments, .. }, PvhBootCapability::PvhEntryPresent(entry)) => {
            let entry = entry.0;
            if !segments.iter().any(|&(s, e)| (s..e).contains(&entry)) {
                return Err(format!(
                    "the PVH entry point {entry:#x} (Xen note XEN_ELFNOTE_PHYS32_ENTRY) is not inside a loaded segment"
                ));
            }
            Ok(LoadedImage::Pvh { entry, segments })
        }
        (LoadedImage::Elf { entry, segments }, _) => {
            if !segments.iter().any(|&(s, e)| (s..e).contains(&entry)) {
                return Err(format!("entry point {entry:#x} is not inside a loaded segment"));
            }
            Ok(LoadedImage::Elf { entry, segments })
        }
        (plan, _) => Ok(plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(paddr: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(ELF_MAGIC);
        ehdr.e_ident[4] = ELFCLASS64;
        ehdr.e_ident[5] = ELFDATA2LSB;
        ehdr.e_type = ET_EXEC;
        ehdr.e_machine = EM_X86_64;
        ehdr.e_entry = entry;
        ehdr.e_phoff = 64;
        ehdr.e_phentsize = 56;
        ehdr.e_phnum = 1;
        let phdr = Elf64_Phdr {
            p_type: PT_LOAD,
            p_offset: 0,
            p_paddr: paddr,
            p_filesz: 120,
            p_memsz: memsz,
            ..Default::default()
        };
        let mut v = ehdr.as_slice().to_vec();
        v.extend_from_slice(phdr.as_slice());
        v
    }

    #[test]
    fn accepts_a_segment_above_1m() {
        let plan = plan_elf(&elf(0x20_0000, 0x1000, 0x20_0010), 16 << 20).unwrap();
        assert_eq!(
            plan,
            LoadedImage::Elf {
                entry: 0x20_0010,
                segments: vec![(0x20_0000, 0x20_1000)]
            }
        );
    }

    #[test]
    fn refuses_low_segments_and_segments_past_memory() {
        assert!(
            plan_elf(&elf(0x8000, 0x1000, 0x8000), 16 << 20)
                .unwrap_err()
                .contains("below 1 MiB")
        );
        assert!(
            plan_elf(&elf(0xff_0000, 0x2_0000, 0xff_0000), 16 << 20)
                .unwrap_err()
                .contains("outside guest memory")
        );
        let outside = plan_elf(&elf(0x20_0000, 0x1000, 0x40_0000), 16 << 20).unwrap();
        assert!(
            pvh_plan(outside.clone(), &PvhBootCapability::PvhEntryNotPresent)
                .unwrap_err()
                .contains("entry point 0x400000")
        );
        // A PVH guest starts at its note's entry; `e_entry` is not used.
        let pvh = PvhBootCapability::PvhEntryPresent(GuestAddress(0x20_0040));
        assert!(matches!(
            pvh_plan(outside, &pvh),
            Ok(LoadedImage::Pvh { entry: 0x20_0040, .. })
        ));
    }

    #[test]
    fn a_pvh_note_selects_the_pvh_entry() {
        let plan = plan_elf(&elf(0x20_0000, 0x1000, 0x20_0010), 16 << 20).unwrap();
        let pvh = |at| PvhBootCapability::PvhEntryPresent(GuestAddress(at));
        assert_eq!(
            pvh_plan(plan.clone(), &pvh(0x20_0040)).unwrap(),
            LoadedImage::Pvh {
                entry: 0x20_0040,
                segments: vec![(0x20_0000, 0x20_1000)]
            }
        );
        assert_eq!(
            pvh_plan(plan.clone(), &PvhBootCapability::PvhEntryNotPresent).unwrap(),
            plan
        );
        assert!(
            pvh_plan(plan, &pvh(0x30_0000))
                .unwrap_err()
                .contains("PVH entry point 0x300000")
        );
    }

    /// The built-in PVH guests carry the note linux-loader (and so
    /// cloud-hypervisor and Firecracker) recognises, and load as PVH.
    #[test]
    fn the_built_in_pvh_guests_load_as_pvh() {
        for (name, bytes) in [("pvh.elf", PVH_GUEST), ("pvh_reload.elf", PVH_RELOAD_GUEST)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let size = 16 << 20;
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
            let loaded = Elf::load(&mem, None, &mut std::fs::File::open(&path).unwrap(), None).unwrap();
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                panic!("{name}: no PVH note: {:?}", loaded.pvh_boot_cap);
            };
            match load(&path, &mem, size).unwrap() {
                LoadedImage::Pvh { entry: e, .. } => assert_eq!(e, entry.0, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_truncated_headers() {
        assert!(
            plan_elf(&elf(0x20_0000, 0x1000, 0x20_0000)[..70], 16 << 20)
                .unwrap_err()
                .contains("program header")
        );
        assert!(plan_elf(b"\x7fELF\x02", 16 << 20).unwrap_err().contains("truncated"));
    }
}
