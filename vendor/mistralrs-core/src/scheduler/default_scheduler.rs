use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroUsize,
    sync::{atomic::Ordering, Arc},
};

use crate::{
    engine::{IntervalLogger, TERMINATE_ALL_NEXT_STEP},
    paged_attention::KVCacheManager,
    sequence::{Sequence, SequenceState, StopReason},
};

use super::{Scheduler, SchedulerOutput};

pub trait FcfsBacker: Default {
    fn new() -> Self;
    fn add(&mut self, item: Sequence);
    fn into_iter(self) -> impl Iterator<Item = Sequence>;
    fn len(&self) -> usize;
    fn sort_ascending_ids(&mut self);
}

impl FcfsBacker for VecDeque<Sequence> {
    fn new() -> Self {
        Self::new()
    }
    fn add(&mut self, item: Sequence) {
        self.push_back(item)
    }
    fn into_iter(self) -> impl Iterator<Item = Sequence> {
        <Self as IntoIterator>::into_iter(self)
    }
    fn sort_ascending_ids(&mut self) {
        let slice = self.make_contiguous();
        slice.sort_by_key(|seq| *seq.id());
    }
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
}

pub struct DefaultSchedulerOutput<'a> {
    pub completion: Box<[&'a mut Sequence]>,
    pub prompt: Box<[&'a mut Sequence]>,
}

/// The scheduler method controld how sequences are scheduled during each
/// step of the engine. For each scheduling step, the scheduler method is used if there
/// are not only running, only waiting sequences, or none. If is it used, then it
/// is used to allow waiting sequences to run.
#[derive(Clone)]
pub enum DefaultSchedulerMethod {
    Fixed(NonZeroUsize),
}

pub struct BucketedSeqs<Backer: FcfsBacker> {
    running: Vec<Sequence>,
    waiting: Backer,
}

pub trait BucketingManager<Backer: FcfsBacker>: Send + Sync {
    /// Bucket and waitlist running input sequences, returning the newly running sequences.
    fn bucket_and_waitlist_seqs_waiting(
        &mut self,
        running: Vec<Sequence>,
        waiting: Backer,
        discrete: bool,
    ) -> BucketedSeqs<Backer>;

    /// Local change (vendor/README.md): see `FixedBucketingManager::mixed_length_completions`.
    fn set_mixed_length_completions(&mut self, _enabled: bool) {}
}

// (cache length, (has_imgs && is_prompt), sequence offset)
// Bucket by that metric for images because if we are not a prompt, then this doesn't apply
type BucketKey = (usize, bool, usize);

struct FixedBucketingManager {
    /// Local change (vendor/README.md): when the pipeline decodes sequences of different lengths
    /// in one forward pass (`Pipeline::decodes_mixed_lengths`), every decoding sequence runs in
    /// each step, beside the one bucket of prompts chosen as before; otherwise (upstream) one
    /// bucket of equal lengths runs, prompts and decoding sequences alike.
    mixed_length_completions: bool,
}

impl<Backer: FcfsBacker> BucketingManager<Backer> for FixedBucketingManager {
    fn set_mixed_length_completions(&mut self, enabled: bool) {
        self.mixed_length_completions = enabled;
    }

    /// Move the sequences into buckets, and run the ones with the shortest lengths.
    /// The others are moved to the waiting list (retaining high priority due to start time),
    /// without a state modification.
    fn bucket_and_waitlist_seqs_waiting(
        &mut self,
        running: Vec<Sequence>,
        waiting: Backer,
        discrete: bool,
    ) -> BucketedSeqs<Backer> {
        if !self.mixed_length_completions {
            return Self::bucket(running, waiting, discrete);
        }
        let (mut completions, prompts): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|seq| seq.is_completion());
        let BucketedSeqs { running, waiting } = Self::bucket(prompts, waiting, discrete);
        completions.extend(running);
        BucketedSeqs { running: completions, waiting }
    }
}

impl FixedBucketingManager {
    fn bucket<Backer: FcfsBacker>(
        running: Vec<Sequence>,
        mut waiting: Backer,
        discrete: bool,
    ) -> BucketedSeqs<Backer> {
        // Now, get the sequences with the smallest sequence lengths, and allow them to catch up.
        let mut seq_buckets: HashMap<BucketKey, Vec<Sequence>> = HashMap::new();
        let mut seq_priorities: HashMap<BucketKey, f64> = HashMap::new();
        for seq in running {
            let len = seq.len();
            match seq_buckets.get_mut(&(
                len,
                seq.images().is_some() && seq.is_prompt(),
                seq.token_offset(),
            )) {
                Some(bucket) => {
                    if !discrete {
                        *seq_priorities
                            .get_mut(&(
                                len,
                                seq.images().is_some() && seq.is_prompt(),
                                seq.token_offset(),
                            ))
                            .unwrap() += seq.compute_priority();
                    }
                    bucket.push(seq);
                }
                None => {
                    if !discrete {
                        seq_priorities.insert(
                            (
                                len,
                                seq.images().is_some() && seq.is_prompt(),
                                seq.token_offset(),
                            ),
                            seq.compute_priority(),
                        );
                    }
                    seq_buckets.insert(
                        (
                            len,
                            seq.images().is_some() && seq.is_prompt(),
                            seq.token_offset(),
                        ),
                        vec![seq],
                    );
                }
            }
        }
        let running = if seq_buckets.len() <= 1 {
            // Full steam ahead or have everything
            seq_buckets
                .into_iter()
                .flat_map(|(_, x)| x)
                .map(|s| s.reset_urgency())
                .collect::<Vec<_>>()
        } else {
            // Set the min seqs to be the running ones, and the rest to be waiting (but their states are not changed!)
            // Allow the min seqs to catch up.
            let min = *seq_buckets
                .keys()
                .min_by_key(|(x, _, _)| *x)
                .expect("No sequence buckets.");
            let len = if !discrete {
                seq_priorities
                    .iter()
                    .max_by(|(_, a), (_, b)| a.partial_cmp(b).unwrap())
                    .map(|(a, b)| (a, *b))
                    .unwrap_or_else(|| (&min, seq_priorities[&min]))
                    .0
            } else {
                &min
            };
            let highest_priority_seqs = seq_buckets
                .remove(len)
                .unwrap()
                .into_iter()
                .map(|s| s.reset_urgency())
                .collect();
            for (_, seqs) in seq_buckets {
                for seq in seqs {
                    waiting.add(seq.add_urgency());
                }
            }
            // Know min_seqs.len < running.len() <= max
            highest_priority_seqs
        };
        BucketedSeqs { running, waiting }
    }
}

pub struct DefaultScheduler<Backer: FcfsBacker> {
    waiting: Backer,
    running: Vec<Sequence>,
    method: DefaultSchedulerMethod,
    bucketing_manager: Box<dyn BucketingManager<Backer>>,
}

impl<Backer: FcfsBacker> DefaultScheduler<Backer> {
    pub fn new(method: DefaultSchedulerMethod) -> Self {
        let bucketing_manager: Box<dyn BucketingManager<_>> = match method {
            DefaultSchedulerMethod::Fixed(_) => Box::new(FixedBucketingManager { mixed_length_completions: false }),
        };
        Self {
            running: Vec::new(),
            waiting: Backer::new(),
            method,
            bucketing_manager,
        }
    }

    /// Move the sequences into buckets, and run the ones with the shortest lengths.
    /// The others are moved to the waiting list (retaining high priority due to start time),
    /// without a state modification.
    fn bucket_and_waitlist_seqs(&mut self, running: Vec<Sequence>) -> Vec<Sequence> {
        let waiting = std::mem::take(&mut self.waiting);
        let BucketedSeqs { running, waiting } = self
            .bucketing_manager
            .bucket_and_waitlist_seqs_waiting(running, waiting, true);
        self.waiting = waiting;
        running
    }

    /// Schedule all sequences based on their state and the available space.
    pub fn schedule(&mut self, logger: &IntervalLogger) -> DefaultSchedulerOutput<'_> {
        // Filter out all done sequences
        let running = std::mem::take(&mut self.running);
        let mut waiting = std::mem::take(&mut self.waiting);
        let mut running = running
            .into_iter()
            .filter(|seq| seq.is_running())
            .collect::<Vec<_>>();

        match (waiting.len(), running.len()) {
            (0, 0) => {
                self.running = running;
                logger.set_num_running(self.running.len());
                logger.set_num_waiting(self.waiting.len());
                return DefaultSchedulerOutput {
                    prompt: vec![].into(),
                    completion: vec![].into(),
                };
            }
            (_, 0) => {
                // Local change (vendor/README.md): admit only what fits `max_num_seqs`, and
                // keep the state of sequences that bucketing had sent back mid-generation
                // (upstream reset every one to `RunningPrompt`, re-prefilling them, and with a
                // prefix-cache hit appending their tokens again at the wrong positions).
                waiting.sort_ascending_ids();
                let mut new_waiting = Backer::new();
                for seq in waiting.into_iter() {
                    if self.sequence_fits(&self.running, &seq) {
                        if seq.is_waiting() {
                            seq.set_state(SequenceState::RunningPrompt);
                        }
                        self.running.push(seq);
                    } else {
                        new_waiting.add(seq);
                    }
                }
                self.waiting = new_waiting;
                let running = std::mem::take(&mut self.running);
                self.running = self.bucket_and_waitlist_seqs(running);
                logger.set_num_running(self.running.len());
                logger.set_num_waiting(self.waiting.len());
                let (completion, prompt): (Vec<_>, Vec<_>) =
                    self.running.iter_mut().partition(|seq| seq.is_completion());
                return DefaultSchedulerOutput {
                    prompt: prompt.into(),
                    completion: completion.into(),
                };
            }
            (0, _) => {
                self.running = self.bucket_and_waitlist_seqs(running);
                if TERMINATE_ALL_NEXT_STEP.load(Ordering::SeqCst) {
                    self.running
                        .iter_mut()
                        .for_each(|seq| seq.set_state(SequenceState::Done(StopReason::Canceled)));
                    TERMINATE_ALL_NEXT_STEP.store(false, Ordering::SeqCst);
                }
                logger.set_num_running(self.running.len());
                logger.set_num_waiting(self.waiting.len());
                return DefaultSchedulerOutput {
                    prompt: vec![].into(),
                    completion: self.running.iter_mut().collect::<Vec<_>>().into(),
                };
            }
            _ => {}
        }

        // Sort the waiting seqs
        waiting.sort_ascending_ids();

        // If the waiting sequence will fit, add it. Otherwise remove it
        let mut new_waiting = Backer::new();
        for seq in waiting.into_iter() {
            if self.sequence_fits(&running, &seq) {
                if seq.is_waiting() {
                    seq.set_state(SequenceState::RunningPrompt);
                }
                running.push(seq);
            } else {
                new_waiting.add(seq);
            }
        }

        let BucketedSeqs {
            running,
            waiting: new_waiting,
        } = self
            .bucketing_manager
            .bucket_and_waitlist_seqs_waiting(running, new_waiting, false);

        self.running = running;
        self.waiting = new_waiting;

        logger.set_num_running(self.running.len());
        logger.set_num_waiting(self.waiting.len());

        let mut completion = Vec::new();
        let mut prompt = Vec::new();
        for seq in &mut self.running {
            if seq.is_completion() {
                completion.push(seq);
            } else {
                prompt.push(seq);
            }
        }

        DefaultSchedulerOutput {
            completion: completion.into(),
            prompt: prompt.into(),
        }
    }

    fn sequence_fits(&self, running: &[Sequence], _seq: &Sequence) -> bool {
        match &self.method {
            DefaultSchedulerMethod::Fixed(n) => (running.len() + 1) <= (*n).into(),
        }
    }
}

impl Scheduler for DefaultScheduler<VecDeque<Sequence>> {
    fn schedule(&mut self, logger: &IntervalLogger) -> SchedulerOutput<'_> {
        SchedulerOutput::DefaultScheduler {
            output: self.schedule(logger),
        }
    }
    fn waiting_len(&self) -> usize {
        self.waiting.len()
    }
    fn running_len(&self) -> usize {
        self.running.len()
    }
    fn add_seq(&mut self, seq: Sequence) {
        if seq.is_running() {
            // prefill case
            self.running.push(seq);
        } else {
            self.waiting.add(seq);
        }
    }
    fn block_size(&self) -> Option<usize> {
        None
    }
    fn free_finished_sequence_groups(&mut self) {
        // Remove finished sequences
        self.running.retain(|seq| !seq.is_finished_paged_attn());
    }
    fn get_finished_recurrent_indices(&self) -> Vec<usize> {
        self.running
            .iter()
            .filter(|seq| seq.is_finished_paged_attn())
            .filter_map(|seq| seq.recurrent_state_idx())
            .collect()
    }
    fn kv_cache_manager(&self) -> Option<Arc<tokio::sync::Mutex<KVCacheManager>>> {
        None
    }
    fn set_mixed_length_decoding(&mut self, enabled: bool) {
        self.bucketing_manager.set_mixed_length_completions(enabled);
    }
    fn set_prefix_caching_enabled(&mut self, _enabled: bool) {
        // DefaultScheduler doesn't use PagedAttention prefix caching
    }
}

#[cfg(test)]
mod tests {
    //! Local change (vendor/README.md): the scheduler when nothing is running.

    use std::collections::VecDeque;
    use std::num::NonZeroUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::{mpsc::channel, Mutex};

    use super::{DefaultScheduler, DefaultSchedulerMethod};
    use crate::engine::IntervalLogger;
    use crate::sampler::Sampler;
    use crate::sequence::{
        SeqStepType, Sequence, SequenceGroup, SequenceRecognizer, SequenceState,
    };

    fn sequence(id: usize, len: usize) -> Sequence {
        let (tx, _rx) = channel(1);
        let sampler =
            Sampler::new(None, 0, None, None, None, None, None, 32, 1.0, 0.0, vec![]).unwrap();
        let group = Arc::new(Mutex::new(SequenceGroup::new(1, false, true, None)));
        Sequence::new_waiting(
            (0..len as u32).collect(),
            "prompt".to_string(),
            id,
            0,
            1, // layers
            tx,
            sampler,
            vec![],
            vec![],
            None,
            false,
            false,
            group,
            0,
            0,
            SequenceRecognizer::None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            SeqStepType::PromptAndDecode,
            None,
            None,
            None,
            false,
            vec![],
        )
    }

    fn scheduler(max_num_seqs: usize) -> DefaultScheduler<VecDeque<Sequence>> {
        DefaultScheduler::new(DefaultSchedulerMethod::Fixed(
            NonZeroUsize::new(max_num_seqs).unwrap(),
        ))
    }

    /// Upstream moved every waiting sequence to running when none ran, past `max_num_seqs`.
    #[test]
    fn admits_at_most_max_num_seqs_when_idle() {
        let logger = IntervalLogger::new(Duration::from_secs(3600), None);
        let mut s = scheduler(2);
        for id in 0..5 {
            s.waiting.push_back(sequence(id, 8));
        }
        let out = s.schedule(&logger);
        let ids: Vec<usize> = out.prompt.iter().map(|seq| *seq.id()).collect();
        assert_eq!(ids, [0, 1]);
        assert!(out.completion.is_empty());
        assert_eq!(s.waiting.len(), 3);
    }

    /// With mixed-length decoding (`set_mixed_length_decoding`), every decoding sequence runs
    /// in the step, whatever its length, beside one bucket of prompts of equal length; without
    /// it (upstream), one bucket of equal lengths runs.
    #[test]
    fn decodes_every_length_together_when_the_pipeline_can() {
        use crate::scheduler::Scheduler;
        let logger = IntervalLogger::new(Duration::from_secs(3600), None);
        for mixed in [false, true] {
            let mut s = scheduler(8);
            s.set_mixed_length_decoding(mixed);
            for (id, len) in [(0, 8), (1, 9), (2, 10)] {
                let seq = sequence(id, len);
                seq.set_state(SequenceState::RunningCompletion);
                s.running.push(seq);
            }
            for (id, len) in [(3, 5), (4, 5), (5, 7)] {
                s.waiting.push_back(sequence(id, len));
            }
            let out = DefaultScheduler::schedule(&mut s, &logger);
            let mut completion: Vec<usize> = out.completion.iter().map(|seq| *seq.id()).collect();
            completion.sort();
            let prompt_lens: Vec<usize> = out.prompt.iter().map(|seq| seq.len()).collect();
            if mixed {
                assert_eq!(completion, [0, 1, 2]);
                assert!(!prompt_lens.is_empty() && prompt_lens.iter().all(|&l| l == prompt_lens[0]), "{prompt_lens:?}");
            } else {
                let lens: Vec<usize> = out.completion.iter().chain(out.prompt.iter()).map(|seq| seq.len()).collect();
                assert!(!lens.is_empty() && lens.iter().all(|&l| l == lens[0]), "one bucket, got lengths {lens:?}");
            }
        }
    }

    /// A sequence sent back to waiting mid-generation (another length bucket ran) resumes
    /// decoding: upstream reset it to `RunningPrompt`, so it was prefilled again.
    #[test]
    fn keeps_mid_generation_state_when_idle() {
        let logger = IntervalLogger::new(Duration::from_secs(3600), None);
        let mut s = scheduler(4);
        let decoding = sequence(0, 8);
        decoding.set_state(SequenceState::RunningCompletion);
        s.waiting.push_back(decoding);
        let out = s.schedule(&logger);
        assert!(out.prompt.is_empty());
        let ids: Vec<usize> = out.completion.iter().map(|seq| *seq.id()).collect();
        assert_eq!(ids, [0]);
        assert!(out.completion[0].is_completion());
    }
}
