//! Capacity planning and host tuning for flowattr collectors: how many nodes, cores, disk
//! bandwidth and memory a fleet's flow rate needs. Filled in by a later issue.
