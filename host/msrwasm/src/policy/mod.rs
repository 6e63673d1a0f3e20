//! A VM's MSR policy: the loaded plugins in order, the claim table, the
//! filter plan they need, and what happens to accesses nobody answers.

pub(crate) mod claims;
pub(crate) mod fallback;
pub(crate) mod filter;
pub(crate) mod manifest;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::msr::PluginInfo;
use crate::plugin::{LoadError, Plugin, PluginInstance};
use claims::ClaimTable;
use filter::{FilterError, FilterPlan};
pub use manifest::{FilterDefault, MAX_TEMPLATES, ManifestError, MsrTemplate, PolicySpec, Unhandled};

/// MSRs guests read at high rates: deflecting one costs an exit per access
/// (`docs/manifest.md`, "Exit storms").
pub(crate) const HOT_MSRS: &[(u32, u32, &str)] = &[
    (0x10, 0x10, "IA32_TSC"),
    (0xc1, 0xc8, "IA32_PMCx"),
    (0xe7, 0xe8, "IA32_MPERF/APERF"),
    (0x186, 0x18d, "IA32_PERFEVTSELx"),
    (0x309, 0x30b, "IA32_FIXED_CTRx"),
    (0x38d, 0x390, "IA32_PERF_GLOBAL_*"),
    (0x6e0, 0x6e0, "IA32_TSC_DEADLINE"),
    (0xc001_0000, 0xc001_0007, "AMD PERF_EVTSEL/PERF_CTR"),
    (0xc001_0200, 0xc001_020b, "AMD PERF_CTL/PERF_CTR"),
];

/// Warnings for claims (of plugins that did not confirm `hot_msrs`) and
/// templates covering MSRs guests read at high rates.
pub(crate) fn exit_storm_warnings<'a>(
    claims: impl IntoIterator<Item = (&'a str, bool, (u32, u32))>,
    templates: &[MsrTemplate],
) -> Vec<String> {
    let hot = |first: u32, last: u32| {
        HOT_MSRS
            .iter()
            .filter(move |h| h.0 <= last && h.1 >= first)
            .map(move |h| format!("{:#x} ({})", h.0.max(first), h.2))
    };
    let mut out = Vec::new();
    for (plugin, confirmed, (first, last)) in claims {
        if !confirmed {
            out.extend(hot(first, last).map(|m| {
                format!("plugin `{plugin}` claims {m}, which guests read at high rates: an exit per read (docs/manifest.md, \"Exit storms\"); set hot_msrs = true in its [[plugin]] table if that is intended")
            }));
        }
    }
    for t in templates {
        out.extend(hot(t.index, t.index).map(|m| {
            format!("a template covers {m}, which guests read at high rates: an exit per read (docs/manifest.md, \"Exit storms\")")
        }));
    }
    out
}

/// Whether a template on `index` takes the MSR over entirely.
pub(crate) fn template_read_only(index: u32) -> bool {
    TEMPLATE_READ_ONLY.iter().any(|&(i, _)| i == index)
}

/// Read-only MSRs whose KVM handling a template may take over although a
/// plugin could not claim them: hardware faults every guest write, so the
/// template answers reads (the host value with its bits) and writes #GP.
pub(crate) const TEMPLATE_READ_ONLY: &[(u32, &str)] =
    &[(0x10a, "IA32_ARCH_CAPABILITIES"), (0x345, "IA32_PERF_CAPABILITIES")];

/// Why a policy cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The manifest is refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A plugin is refused.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The claims or the firewall cannot be expressed as a KVM filter, or
    /// the VMM's filter sink refused the plan.
    #[error("{}MSR filter", manifest.as_ref().map(|m| format!("manifest {}: ", m.display())).unwrap_or_default())]
    Filter {
        /// The manifest the policy came from, if any.
        manifest: Option<PathBuf>,
        /// Why.
        #[source]
        source: FilterError,
    },
    /// A claimed MSR is one KVM handles with guest-only checks that a
    /// KVM fallback could not reproduce (`docs/security.md` lists them).
    #[error(
        "plugin `{plugin}` claims {index:#x} ({name}), which KVM handles with checks only guest accesses get ({why}): if every plugin passed on it, msrwasm could not give the guest KVM's answer (user space can only make host-initiated accesses), so it cannot be claimed; claim around it"
    )]
    UnsafeFallback {
        /// The claiming plugin.
        plugin: String,
        /// The MSR.
        index: u32,
        /// Its name.
        name: &'static str,
        /// What KVM does differently for the guest.
        why: &'static str,
    },
    /// A template names an MSR whose guest handling msrwasm cannot model.
    #[error("template for MSR {index:#x}: cannot be modelled: {why}")]
    TemplateUnmodelled {
        /// The MSR.
        index: u32,
        /// Why.
        why: String,
    },
    /// A plugin carries templates in its metadata without the grant.
    #[error(
        "plugin `{plugin}` carries CPU templates (metadata `template.*`): its [[plugin]] table must grant them (grants = [\"templates\"])"
    )]
    TemplatesNotGranted {
        /// The plugin.
        plugin: String,
    },
    /// Two templates for one MSR (the manifest's and a plugin's, or two
    /// plugins').
    #[error("plugin `{plugin}` carries a template for MSR {index:#x}, which already has one")]
    DuplicateTemplate {
        /// The MSR.
        index: u32,
        /// The plugin whose template came second.
        plugin: String,
    },
    /// More plugins than one policy may chain.
    #[error("{count} plugins: at most {} may be chained in one VM", manifest::MAX_PLUGINS)]
    TooManyPlugins {
        /// How many were given.
        count: usize,
    },
    /// Two plugins share a name.
    #[error("duplicate plugin name `{0}`")]
    DuplicateName(String),
    /// An instance of a new version failed on a vCPU (init refused there).
    #[error("on vCPU {vcpu}")]
    Vcpu {
        /// The vCPU.
        vcpu: u32,
        /// What failed.
        #[source]
        source: LoadError,
    },
    /// An `oci://` plugin could not be made local.
    #[error("plugin `{plugin}`")]
    Oci {
        /// The plugin.
        plugin: String,
        /// Why.
        #[source]
        source: Box<crate::oci::OciError>,
    },
    /// The engine is shut down and takes no more changes.
    #[error("the engine is shut down")]
    Closed,
}

/// A policy in force: the loaded plugin versions in chain order plus
/// everything derived from their claims, under one generation number.
/// Immutable (a change makes a new `Policy`); what [`crate::VcpuEvents`]
/// sinks are told a dispatcher moved to.
pub struct Policy {
    generation: u64,
    plugins: Vec<Arc<Plugin>>,
    table: ClaimTable,
    filter: FilterPlan,
    unhandled: Unhandled,
    /// CPU templates, sorted by MSR.
    templates: Vec<MsrTemplate>,
    /// Instances of new plugin versions made off the vCPU threads, taken by
    /// each vCPU at its switch: `(vcpu, chain position, instance)`.
    prepared: Mutex<Vec<(u32, usize, PluginInstance)>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("generation", &self.generation)
            .field("plugins", &self.plugins)
            .field("unhandled", &self.unhandled)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Composes loaded plugins (in chain order) under `spec`'s unhandled
    /// policy and firewall.
    pub(crate) fn compose(plugins: Vec<Arc<Plugin>>, spec: &PolicySpec, generation: u64) -> Result<Self, PolicyError> {
        Self::compose_with(plugins, spec, generation, true)
    }

    /// As [`Policy::compose`]; `enforce_grants = false` (for `check`, which
    /// warns instead) lets plugins carry templates without their grant.
    pub(crate) fn compose_with(
        plugins: Vec<Arc<Plugin>>,
        spec: &PolicySpec,
        generation: u64,
        enforce_grants: bool,
    ) -> Result<Self, PolicyError> {
        if plugins.len() > manifest::MAX_PLUGINS {
            return Err(PolicyError::TooManyPlugins { count: plugins.len() });
        }
        let mut names = std::collections::HashSet::new();
        for p in &plugins {
            if !names.insert(p.name()) {
                return Err(PolicyError::DuplicateName(p.name().to_owned()));
            }
        }
        let claims = plugins
            .iter()
            .flat_map(|p| p.claims().unwrap_or_default().iter().map(move |&r| (p.name(), r)));
        // The manifest's templates, then those plugins carry: one per MSR.
        let mut templates = spec.templates.clone();
        for p in &plugins {
            if !p.templates().is_empty() && !p.settings().templates && enforce_grants {
                return Err(PolicyError::TemplatesNotGranted {
                    plugin: p.name().to_owned(),
                });
            }
            for t in p.templates() {
                if templates.iter().any(|o| o.index == t.index) {
                    return Err(PolicyError::DuplicateTemplate {
                        index: t.index,
                        plugin: p.name().to_owned(),
                    });
                }
                templates.push(*t);
            }
        }
        templates.sort_by_key(|t| t.index);
        // A read-only MSR a template took over has no KVM fallback to
        // protect: the template answers what every plugin passes on.
        let taken_over = |index: u32| template_read_only(index) && templates.iter().any(|t| t.index == index);
        for (plugin, (first, last)) in claims.clone() {
            let mut from = first;
            while let Some((index, name, why)) = fallback::first_unsafe(from, last) {
                if !taken_over(index) {
                    return Err(PolicyError::UnsafeFallback {
                        plugin: plugin.to_owned(),
                        index,
                        name,
                        why,
                    });
                }
                match index.checked_add(1) {
                    Some(next) if next <= last => from = next,
                    _ => break,
                }
            }
        }
        let filter_error = |source| PolicyError::Filter {
            manifest: spec.manifest.clone(),
            source,
        };
        let plan = FilterPlan::build(claims, spec.filter_default, &spec.allow).map_err(filter_error)?;
        for t in &templates {
            let refused = |why: String| PolicyError::TemplateUnmodelled { index: t.index, why };
            if let Some((_, name, why)) = fallback::first_unsafe(t.index, t.index)
                && !template_read_only(t.index)
            {
                return Err(refused(format!(
                    "{name}: KVM handles it with checks only guest accesses get ({why})"
                )));
            }
            let kvm_base = template_read_only(t.index)
                || (fallback::rule(t.index, false) == Some(fallback::Rule::Kvm)
                    && fallback::rule(t.index, true) == Some(fallback::Rule::Gp));
            if !kvm_base && !plan.plugin_claims(t.index) {
                return Err(refused(
                    "guests may write it, or msrwasm cannot read KVM's value the way the guest would (docs/security.md): \
                     a template covers read-only MSRs, or MSRs a plugin claims (and models)"
                        .into(),
                ));
            }
            if plan.firewall_denies(t.index) && !plan.plugin_claims(t.index) {
                return Err(refused(
                    "the firewall (filter_default = \"deny\") denies it: add it to `allow`, or claim it by a plugin"
                        .into(),
                ));
            }
        }
        let filter = plan.with_templates(templates.clone()).map_err(filter_error)?;
        for warning in exit_storm_warnings(
            plugins.iter().flat_map(|p| {
                let confirmed = p.settings().hot_msrs;
                p.claims()
                    .unwrap_or_default()
                    .iter()
                    .map(move |&r| (p.name(), confirmed, r))
            }),
            &templates,
        ) {
            tracing::warn!(event = "exit_storm", "{warning}");
        }
        let claim_lists: Vec<_> = plugins.iter().map(|p| p.claims()).collect();
        Ok(Self {
            generation,
            table: ClaimTable::new(&claim_lists),
            plugins,
            filter,
            unhandled: spec.unhandled,
            templates,
            prepared: Mutex::default(),
        })
    }

    /// The generation this policy went live under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The plugin versions, in chain order (a position in
    /// [`crate::VcpuEvents::plugin_call`] indexes this).
    pub fn plugins(&self) -> impl ExactSizeIterator<Item = &PluginInfo> + '_ {
        self.plugins.iter().map(|p| p.info())
    }

    /// The loaded plugins, in chain order.
    pub(crate) fn chain(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// The filter plan the claims and the firewall need.
    pub fn filter(&self) -> &FilterPlan {
        &self.filter
    }

    /// What happens to accesses nobody answers.
    pub fn unhandled(&self) -> Unhandled {
        self.unhandled
    }

    /// The CPU template of MSR `index`, if any.
    pub(crate) fn template(&self, index: u32) -> Option<&MsrTemplate> {
        match self.templates.binary_search_by_key(&index, |t| t.index) {
            Ok(i) => Some(&self.templates[i]),
            Err(_) => None,
        }
    }

    /// Chain positions of the plugins to ask about `index`, in order.
    pub(crate) fn askers(&self, index: u32) -> &[usize] {
        self.table.lookup(index)
    }

    pub(crate) fn prepare(&self, vcpu: u32, position: usize, instance: PluginInstance) {
        self.prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((vcpu, position, instance));
    }

    /// The instances prepared for `vcpu`, by chain position.
    pub(crate) fn take_prepared(&self, vcpu: u32) -> Vec<(usize, PluginInstance)> {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = Vec::new();
        let mut i = 0;
        while i < prepared.len() {
            if prepared[i].0 == vcpu {
                let (_, position, instance) = prepared.swap_remove(i);
                mine.push((position, instance));
            } else {
                i += 1;
            }
        }
        mine
    }
}

#[cfg(test)]
mod tests;
