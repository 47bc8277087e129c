//! How a batch's flows are cut into Kafka messages: at most so many flows, and never more
//! bytes than the producer takes in one message. A message over the byte limit is written
//! again as two halves, down to a single flow, so no flows_per_message and no batch of
//! unusually long names can make a message the client refuses (which would stall the sink on
//! a batch it can never send).

use super::wire::Output;
use crate::config::KafkaFormat;
use crate::sink::record::EmittedFlow;

/// librdkafka's default `message.max.bytes`: the most it takes in one message.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The most flows and bytes one message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    pub flows: usize,
    pub bytes: usize,
}

impl MessageLimits {
    /// Room left under librdkafka's `message.max.bytes` for what it adds to a message (its
    /// record's header, attributes and offsets).
    const RECORD_OVERHEAD: usize = 512;

    /// `flows` a message, and what librdkafka's `message.max.bytes` (`max_message_bytes`)
    /// leaves for the payload.
    pub fn new(flows: usize, max_message_bytes: usize) -> MessageLimits {
        MessageLimits {
            flows: flows.max(1),
            bytes: max_message_bytes
                .saturating_sub(Self::RECORD_OVERHEAD)
                .max(1),
        }
    }

    /// The format's default flows a message, under librdkafka's default `message.max.bytes`.
    pub fn default_for(format: KafkaFormat) -> MessageLimits {
        MessageLimits::new(
            format.default_flows_per_message(),
            LIBRDKAFKA_MESSAGE_MAX_BYTES,
        )
    }
}

/// Writes `flows` to `out` as messages within `limits`, each by `encode`, pushing each
/// message's end to `ends`.
pub(super) fn write_messages(
    out: &mut Output,
    ends: &mut Vec<usize>,
    flows: &[EmittedFlow],
    limits: MessageLimits,
    encode: &mut impl FnMut(&mut Output, &[EmittedFlow]),
) {
    for message in flows.chunks(limits.flows) {
        write_within(out, ends, message, limits.bytes, encode);
    }
}

fn write_within(
    out: &mut Output,
    ends: &mut Vec<usize>,
    flows: &[EmittedFlow],
    bytes: usize,
    encode: &mut impl FnMut(&mut Output, &[EmittedFlow]),
) {
    let start = out.len();
    encode(out, flows);
    if out.len() - start > bytes && flows.len() > 1 {
        out.truncate(start);
        write_halves(out, ends, flows, bytes, encode);
    } else {
        ends.push(out.len());
    }
}

/// Apart from [`write_within`] and never inlined, so that the recursion does not keep the
/// common case (a message that fits) from being inlined into [`write_messages`] with its
/// encoder: the row encoder's flow loop then runs with the output in registers (5% of its
/// time, measured).
#[cold]
#[inline(never)]
fn write_halves(
    out: &mut Output,
    ends: &mut Vec<usize>,
    flows: &[EmittedFlow],
    bytes: usize,
    encode: &mut impl FnMut(&mut Output, &[EmittedFlow]),
) {
    let (first, second) = flows.split_at(flows.len() / 2);
    write_within(out, ends, first, bytes, encode);
    write_within(out, ends, second, bytes, encode);
}
