//! The workload that owns a Kubernetes pod, from the labels its controller puts on it: the
//! node has no API server to ask for `ownerReferences`, but every built-in controller labels
//! its pods in a way that tells it apart, and names them after itself.
//!
//! | controller  | label it sets                                   | pod name               |
//! |-------------|-------------------------------------------------|------------------------|
//! | Deployment  | `pod-template-hash` (of its ReplicaSet)         | `<owner>-<hash>-<5>`   |
//! | StatefulSet | `statefulset.kubernetes.io/pod-name`            | `<owner>-<ordinal>`    |
//! | DaemonSet   | `controller-revision-hash`, `pod-template-generation` | `<owner>-<5>`    |
//! | Job         | `batch.kubernetes.io/job-name` (or `job-name`)  | `<owner>-<5>`          |
//! | CronJob     | a Job label whose value ends in `-<minutes>`    | `<owner>-<minutes>-<5>`|
//!
//! A pod none of them owns (a bare pod, or another controller's) is its own owner, kind `Pod`.
//! Kubernetes cuts long generated names short, so a long owner name may come out cut.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
    Pod,
}

impl OwnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Deployment => "Deployment",
            OwnerKind::StatefulSet => "StatefulSet",
            OwnerKind::DaemonSet => "DaemonSet",
            OwnerKind::Job => "Job",
            OwnerKind::CronJob => "CronJob",
            OwnerKind::Pod => "Pod",
        }
    }
}

/// The owner of pod `pod` with `labels`: its kind and name.
pub fn pod_owner(pod: &str, labels: &BTreeMap<String, String>) -> (OwnerKind, String) {
    let label = |key: &str| {
        labels
            .get(key)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    };
    if let Some(job) = label("batch.kubernetes.io/job-name").or_else(|| label("job-name")) {
        // A CronJob names its Jobs `<cronjob>-<scheduled time in minutes since the epoch>`.
        if let Some((cron_job, minutes)) = job.rsplit_once('-')
            && minutes.len() >= 8
            && minutes.bytes().all(|byte| byte.is_ascii_digit())
            && !cron_job.is_empty()
        {
            return (OwnerKind::CronJob, cron_job.to_owned());
        }
        return (OwnerKind::Job, job.to_owned());
    }
    if label("statefulset.kubernetes.io/pod-name").is_some()
        && let Some((set, ordinal)) = pod.rsplit_once('-')
        && !ordinal.is_empty()
        && ordinal.bytes().all(|byte| byte.is_ascii_digit())
    {
        return (OwnerKind::StatefulSet, set.to_owned());
    }
    if label("controller-revision-hash").is_some()
        && label("pod-template-generation").is_some()
        && let Some((set, _)) = pod.rsplit_once('-')
    {
        return (OwnerKind::DaemonSet, set.to_owned());
    }
    if let Some(hash) = label("pod-template-hash")
        && let Some(at) = pod.rfind(&format!("-{hash}-"))
        && at > 0
    {
        return (OwnerKind::Deployment, pod[..at].to_owned());
    }
    (OwnerKind::Pod, pod.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn each_controller_is_told_by_its_labels() {
        let cases = [
            (
                "api-7d9f8b6c5d-x2x9q",
                labels(&[("pod-template-hash", "7d9f8b6c5d"), ("app", "api")]),
                OwnerKind::Deployment,
                "api",
            ),
            (
                "db-2",
                labels(&[
                    ("statefulset.kubernetes.io/pod-name", "db-2"),
                    ("controller-revision-hash", "db-5b4c"),
                ]),
                OwnerKind::StatefulSet,
                "db",
            ),
            (
                "node-agent-k8v2p",
                labels(&[
                    ("controller-revision-hash", "6f7c"),
                    ("pod-template-generation", "3"),
                ]),
                OwnerKind::DaemonSet,
                "node-agent",
            ),
            (
                "migrate-v3-7xk2p",
                labels(&[
                    ("batch.kubernetes.io/job-name", "migrate-v3"),
                    ("job-name", "migrate-v3"),
                ]),
                OwnerKind::Job,
                "migrate-v3",
            ),
            (
                "backup-29012345-abcde",
                labels(&[("job-name", "backup-29012345")]),
                OwnerKind::CronJob,
                "backup",
            ),
            (
                "debug",
                labels(&[("run", "debug")]),
                OwnerKind::Pod,
                "debug",
            ),
            // A hash label the name does not carry: not taken apart.
            (
                "odd",
                labels(&[("pod-template-hash", "abc")]),
                OwnerKind::Pod,
                "odd",
            ),
            // A Job whose own name ends in a short number is a Job.
            (
                "report-2024-x1",
                labels(&[("job-name", "report-2024")]),
                OwnerKind::Job,
                "report-2024",
            ),
        ];
        for (pod, labels, kind, owner) in cases {
            assert_eq!(pod_owner(pod, &labels), (kind, owner.to_owned()), "{pod}");
        }
    }
}
