//! The bus's names with their types: each key-value bucket with the type of its values, each
//! request/reply subject with its request and reply. Services reach the bus through these (the
//! runtime kit's `JobCtx::bucket` and `JobCtx::ask`), so a value cannot go to the wrong bucket
//! or a request to a subject that answers something else.

use std::marker::PhantomData;

use crate::dataset::{CaptionRecord, DatasetManifest, ModelVerdict};
use crate::images::ImageRecord;
use crate::jobs::JobRecord;
use crate::retrieval::{IndexManifest, SearchReply, SearchRequest};
use crate::subjects;

/// A key-value bucket whose values are `V` (as JSON).
pub struct Bucket<V> {
    pub name: &'static str,
    value: PhantomData<fn() -> V>,
}

impl<V> Bucket<V> {
    const fn named(name: &'static str) -> Self {
        Self {
            name,
            value: PhantomData,
        }
    }
}

impl<V> Clone for Bucket<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Bucket<V> {}

/// One [`JobRecord`] per job id.
pub const JOBS: Bucket<JobRecord> = Bucket::named(subjects::JOBS_BUCKET);
/// One [`ImageRecord`] per image sha256.
pub const IMAGES: Bucket<ImageRecord> = Bucket::named(subjects::IMAGES_BUCKET);
/// One [`CaptionRecord`] per `<image sha256>.<caption source id>`.
pub const CAPTIONS: Bucket<CaptionRecord> = Bucket::named(subjects::CAPTIONS_BUCKET);
/// One [`DatasetManifest`] per `<dataset>.<version>`.
pub const DATASETS: Bucket<DatasetManifest> = Bucket::named(subjects::DATASETS_BUCKET);
/// One [`IndexManifest`] per dataset.
pub const INDEXES: Bucket<IndexManifest> = Bucket::named(subjects::INDEXES_BUCKET);
/// One [`crate::dataset::RunSpend`] per caption run.
pub const SPEND: Bucket<crate::dataset::RunSpend> = Bucket::named(subjects::SPEND_BUCKET);
/// One [`crate::dataset::RateBudget`] per endpoint the captioners share.
pub const LIMITS: Bucket<crate::dataset::RateBudget> = Bucket::named(subjects::LIMITS_BUCKET);
/// One [`crate::dataset::CaptionBatches`] per caption job using the Batch API.
pub const BATCHES: Bucket<crate::dataset::CaptionBatches> = Bucket::named(subjects::BATCHES_BUCKET);
/// One [`ModelVerdict`] per model and image, or image and caption.
pub const VERDICTS: Bucket<ModelVerdict> = Bucket::named(subjects::VERDICTS_BUCKET);

/// A core NATS request/reply subject (no stream): `Req` in, `Rep` out, answered by one member
/// of the queue group.
pub struct Query<Req, Rep> {
    pub subject: &'static str,
    pub group: &'static str,
    types: PhantomData<fn(Req) -> Rep>,
}

impl<Req, Rep> Clone for Query<Req, Rep> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req, Rep> Copy for Query<Req, Rep> {}

/// Search a dataset's retrieval index (answered by the retrieval indexer).
pub const SEARCH: Query<SearchRequest, SearchReply> = Query {
    subject: subjects::RETRIEVAL_QUERY,
    group: subjects::RETRIEVAL_QUERY_GROUP,
    types: PhantomData,
};
