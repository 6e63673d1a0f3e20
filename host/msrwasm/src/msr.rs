//! The MSR vocabulary every other part speaks: a deflected access, why KVM
//! deflected it, what the guest gets, who decided, and the plugin versions
//! that answer. A leaf: it depends on nothing else in the crate.

use std::path::PathBuf;

/// Why KVM sent an access to user space (`KVM_MSR_EXIT_REASON_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitReason {
    /// KVM knows the MSR but found the access invalid (a bad value,
    /// reserved bits, a read-only MSR).
    Inval,
    /// KVM does not know the MSR.
    Unknown,
    /// The MSR filter denied the access (a plugin claimed the MSR, the
    /// firewall denies it, or the VMM's own filter range covers it).
    Filter,
}

impl ExitReason {
    /// KVM's bit for this reason (what `msr.reason` returns to plugins).
    pub fn bits(self) -> u32 {
        match self {
            ExitReason::Inval => 1,
            ExitReason::Unknown => 2,
            ExitReason::Filter => 4,
        }
    }

    /// The reason for KVM's bits, if they name exactly one.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            1 => Some(ExitReason::Inval),
            2 => Some(ExitReason::Unknown),
            4 => Some(ExitReason::Filter),
            _ => None,
        }
    }

    /// `inval`, `unknown` or `filter`.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Inval => "inval",
            ExitReason::Unknown => "unknown",
            ExitReason::Filter => "filter",
        }
    }
}

/// RDMSR, or WRMSR with the value written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// RDMSR.
    Read,
    /// WRMSR of this value (EDX:EAX).
    Write(u64),
}

/// A deflected MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// The MSR index (ECX).
    pub index: u32,
    /// Read or write.
    pub op: Op,
    /// Why KVM sent it to user space.
    pub reason: ExitReason,
}

impl Access {
    /// A deflected RDMSR.
    pub fn read(index: u32, reason: ExitReason) -> Self {
        Self {
            index,
            op: Op::Read,
            reason,
        }
    }

    /// A deflected WRMSR.
    pub fn write(index: u32, value: u64, reason: ExitReason) -> Self {
        Self {
            index,
            op: Op::Write(value),
            reason,
        }
    }

    /// Whether this is a WRMSR.
    pub fn is_write(&self) -> bool {
        matches!(self.op, Op::Write(_))
    }
}

/// What the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The RDMSR completes with this value.
    Read(u64),
    /// The WRMSR completes.
    Written,
    /// The instruction faults with #GP(0).
    Gp,
}

/// Who decided an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnsweredBy<'a> {
    /// A plugin answered HANDLED or FAULT, or failed and its
    /// `on_error = "fault"` decided (`error`).
    Plugin {
        /// The plugin version.
        plugin: &'a PluginInfo,
        /// Its position in the chain.
        position: usize,
        /// Whether a plugin error decided.
        error: bool,
    },
    /// Every plugin passed on a claimed MSR and KVM's own handling decided.
    Kvm,
    /// A CPU template (`[[template]]`) decided: the host's value with the
    /// template's bits, or #GP for a write to a read-only MSR it covers.
    Template,
    /// Nobody answered; the VM's `unhandled` policy decided.
    Unhandled(Unhandled),
    /// Nobody answered an access the default-deny MSR firewall denied
    /// (`filter_default = "deny"`, the MSR not in `allow`): it never falls
    /// back to KVM, and the VM's `unhandled` policy decided.
    Firewall(Unhandled),
}

impl AnsweredBy<'_> {
    /// `plugin`, `kvm`, `template`, `unhandled` or `firewall`, as traces and metrics
    /// name it.
    pub fn kind(&self) -> &'static str {
        match self {
            AnsweredBy::Plugin { .. } => "plugin",
            AnsweredBy::Kvm => "kvm",
            AnsweredBy::Template => "template",
            AnsweredBy::Unhandled(_) => "unhandled",
            AnsweredBy::Firewall(_) => "firewall",
        }
    }
}

/// The decision on one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome<'a> {
    /// What the guest gets.
    pub reply: Reply,
    /// Who decided.
    pub by: AnsweredBy<'a>,
    /// Why KVM deflected the access.
    pub reason: ExitReason,
    /// The policy generation that decided.
    pub generation: u64,
}

/// KVM's own handling of an MSR, for claimed MSRs every plugin passed on
/// (`KVM_GET_MSRS`/`KVM_SET_MSRS` on the vCPU: see
/// `kvm::VcpuMsrs`).
pub trait KvmMsrs {
    /// KVM's value, or `None` if KVM does not know the MSR.
    fn get(&mut self, index: u32) -> Option<u64>;
    /// Whether KVM accepted the write.
    fn set(&mut self, index: u32, value: u64) -> bool;
}

/// KVM as a host without one sees it: it knows no MSR. For driving a
/// dispatcher without a VM (tests, `msrwasm test`); a VMM passes its vCPU
/// instead (`kvm::VcpuMsrs`), or "PASS falls back to KVM" is lost.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKvm;

impl KvmMsrs for NoKvm {
    fn get(&mut self, _: u32) -> Option<u64> {
        None
    }

    fn set(&mut self, _: u32, _: u64) -> bool {
        false
    }
}

/// What happens to a deflected access that no plugin answers.
///
/// `ignore` and `log` mirror `kvm.ignore_msrs`: they apply to MSRs KVM does
/// not know (reason UNKNOWN) and to MSRs the filter deflected (reason
/// FILTER). An access KVM itself found invalid (reason INVAL: a bad value
/// for an MSR it knows) stays #GP whatever the policy, as with
/// `kvm.ignore_msrs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unhandled {
    /// Inject #GP, as KVM does by default.
    #[default]
    Gp,
    /// Reads return 0, writes are dropped (a per-VM kvm.ignore_msrs).
    Ignore,
    /// Like ignore, and log each distinct MSR once per VM.
    Log,
}

impl Unhandled {
    /// The name manifests and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Unhandled::Gp => "gp",
            Unhandled::Ignore => "ignore",
            Unhandled::Log => "log",
        }
    }
}

impl std::fmt::Display for Unhandled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Unhandled {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gp" => Ok(Unhandled::Gp),
            "ignore" => Ok(Unhandled::Ignore),
            "log" => Ok(Unhandled::Log),
            other => Err(format!("`{other}` is not one of gp, ignore, log")),
        }
    }
}

/// The two plugin flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// A core module implementing ABI v1.
    Core,
    /// A component implementing the WIT world `msrwasm:plugin/plugin@1.0.0`.
    Component,
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flavour::Core => "core",
            Flavour::Component => "component",
        })
    }
}

/// Who a loaded plugin version is: what traces, logs, the control API and
/// [`crate::Outcome`]s name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PluginInfo {
    /// The plugin's name in the policy.
    pub name: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Hex SHA-256 of the content: the version's identity.
    pub version: String,
    /// Core module or component.
    pub flavour: Flavour,
}

impl PluginInfo {
    /// The first 16 hex digits of the version, as traces and logs show it.
    pub fn short_version(&self) -> &str {
        &self.version[..16.min(self.version.len())]
    }
}
