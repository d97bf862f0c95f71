//! Parquet shards of a dataset version with the images embedded, as the Hugging Face Hub lays
//! them out.

use atelier_contracts::dataset::DatasetRow;

use crate::ext_of;

/// Rows per row group.
const ROW_GROUP: usize = 100;

/// One Parquet file of rows with their images. Columns: `image` (struct of `bytes`, `path`),
/// `image_id`, `text` (the caption), `sha256`, `image_key`, `width`, `height`, `format`,
/// `caption_backend`, `caption_model`, `caption_prompt`, `language`, `words`, `decision`, `tier`,
/// `split`, `signals` (JSON), `tags` (comma-separated), `source`, `license`, and from augment jobs
/// `negatives`, `paraphrases` and `augmentation` (JSON, null when absent). The schema carries the
/// `huggingface` metadata that makes `datasets` decode `image` as an `Image` feature.
pub fn shard(items: &[(&DatasetRow, &bytes::Bytes)]) -> anyhow::Result<Vec<u8>> {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BinaryArray, Int32Array, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Schema};

    let strings = |f: &dyn Fn(&DatasetRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(
            items
                .iter()
                .map(|(r, _)| f(r))
                .collect::<Vec<Option<String>>>(),
        ))
    };
    let ints = |f: &dyn Fn(&DatasetRow) -> Option<i32>| -> ArrayRef {
        Arc::new(Int32Array::from(
            items
                .iter()
                .map(|(r, _)| f(r))
                .collect::<Vec<Option<i32>>>(),
        ))
    };
    let name = |v: &dyn erased_name::Named| v.name();
    let image_fields = [
        Arc::new(Field::new("bytes", DataType::Binary, true)),
        Arc::new(Field::new("path", DataType::Utf8, true)),
    ];
    let image = StructArray::from(vec![
        (
            image_fields[0].clone(),
            Arc::new(BinaryArray::from(
                items
                    .iter()
                    .map(|(_, b)| Some(b.as_ref()))
                    .collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            image_fields[1].clone(),
            Arc::new(StringArray::from(
                items
                    .iter()
                    .map(|(r, _)| Some(format!("{}.{}", r.image_id, ext_of(r))))
                    .collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
    ]);
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("image", Arc::new(image)),
        ("image_id", strings(&|r| Some(r.image_id.clone()))),
        ("text", strings(&|r| r.caption.clone())),
        ("sha256", strings(&|r| Some(r.sha256.clone()))),
        ("image_key", strings(&|r| Some(r.image_key.clone()))),
        ("width", ints(&|r| r.width.map(|w| w as i32))),
        ("height", ints(&|r| r.height.map(|h| h as i32))),
        ("format", strings(&|r| r.format.clone())),
        (
            "caption_backend",
            strings(&|r| r.caption_source.as_ref().map(|c| c.backend.clone())),
        ),
        (
            "caption_model",
            strings(&|r| r.caption_source.as_ref().map(|c| c.model.clone())),
        ),
        (
            "caption_prompt",
            strings(&|r| r.caption_source.as_ref().map(|c| c.prompt.clone())),
        ),
        ("language", strings(&|r| r.language.clone())),
        ("words", ints(&|r| Some(r.words as i32))),
        ("decision", strings(&|r| Some(name(&r.decision)))),
        ("tier", strings(&|r| r.tier.map(|t| name(&t)))),
        ("split", strings(&|r| r.split.map(|s| name(&s)))),
        (
            "signals",
            strings(&|r| serde_json::to_string(&r.signals).ok()),
        ),
        ("tags", strings(&|r| Some(r.tags.join(", ")))),
        ("source", strings(&|r| r.source.clone())),
        ("license", strings(&|r| r.license.clone())),
        (
            "negatives",
            strings(&|r| {
                (!r.negatives.is_empty())
                    .then(|| serde_json::to_string(&r.negatives).ok())
                    .flatten()
            }),
        ),
        (
            "paraphrases",
            strings(&|r| {
                (!r.paraphrases.is_empty())
                    .then(|| serde_json::to_string(&r.paraphrases).ok())
                    .flatten()
            }),
        ),
        (
            "augmentation",
            strings(&|r| {
                r.augmentation
                    .as_ref()
                    .and_then(|a| serde_json::to_string(a).ok())
            }),
        ),
    ];
    let mut features = serde_json::Map::new();
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| {
            let feature = match a.data_type() {
                DataType::Struct(_) => serde_json::json!({"_type": "Image"}),
                DataType::Int32 => serde_json::json!({"dtype": "int32", "_type": "Value"}),
                _ => serde_json::json!({"dtype": "string", "_type": "Value"}),
            };
            features.insert((*n).to_owned(), feature);
            Field::new(*n, a.data_type().clone(), true)
        })
        .collect();
    let hf = serde_json::json!({"info": {"features": features}});
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        std::collections::HashMap::from([("huggingface".to_owned(), hf.to_string())]),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )?;
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props))?;
    // Row groups of ROW_GROUP rows: a reader (the Hub's viewer, `datasets` streaming) holds one
    // group of images at a time.
    let mut start = 0;
    while start < batch.num_rows() {
        let n = ROW_GROUP.min(batch.num_rows() - start);
        w.write(&batch.slice(start, n))?;
        w.flush()?;
        start += n;
    }
    w.close()?;
    Ok(out)
}

/// The serde name of a unit enum (`accept`, `gold`, `val`, …).
mod erased_name {
    pub trait Named {
        fn name(&self) -> String;
    }
    impl<T: serde::Serialize> Named for T {
        fn name(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    }
}
