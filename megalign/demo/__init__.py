"""End-to-end demo on the shipped sample corpus (CPU, about two minutes).

Runs each pipeline step as the CLI command a user would type (printed before it runs), then builds
the training datasets through the Python API and prints decoded samples. Steps so far:
  1. train a SentencePiece tokenizer on the sample        (megalign train-tokenizer)
  2. split the sample by language and tokenize each part   (megalign preprocess)
  3. merge the parts into one dataset                      (megalign merge-datasets)
  4. build a blended 80/20 Arabic/English GPT dataset with a train/valid split, cached indices,
     and the data-parallel sampler; decode a few samples
  5. train the tiny LLaMA-style preset on it, checkpointing half-way, with selective activation
     recomputation and TensorBoard events                                 (megalign train)
  6. resume from that checkpoint and finish the run                       (megalign train --load)
  7. parallel training on 4 CPU processes: tensor parallel 2 x pipeline parallel 2 with sequence
     parallelism over gloo; its checkpoint then resumes in one process (another layout)
                                              (torchrun ... megalign train --tensor-model-parallel-size 2 ...)
  8. native alignment, steps 1-3: dedup (with planted duplicates), seed documents chosen by perplexity
     under the step-6 model, expert annotation over the OpenAI API (a rule-based stand-in expert on
     loopback), SFT records, and the worker fine-tuned from the pre-trained checkpoint
                  (megalign align dedup / seed / annotate / build-sft, preprocess --sft, train --sft --finetune)
  9. native alignment, step 4: the worker rewrites shard 0 of 8 in-process and shard 1 of 8 through
     `megalign serve` (KV-cache generation, validation of every rewrite); shard 2 goes through the
     rule-based stand-in, so that the report shows what a good worker changes   (megalign align rewrite)
 10. the quality report: original vs aligned                                     (megalign align report)
 11. export the checkpoint trained at TP 2 x PP 2 as a Hugging Face folder and check that transformers
     gives the same loss as megalign on a batch; the folder loaded back directly (--hf-dir) gives the
     same logits                                          (megalign convert megalign-to-hf)
 12. Megatron-LM's own Llama-3 launch flags as they are, at tiny sizes on --mock-data with Llama-3's
     128,256-token vocabulary: the fp8 flags are refused by name; the rest trains at TP 4 on 4 processes,
     started from scratch by the --save X --load X idiom (rows padded to 128,512); the checkpoint resumes
     in one process with --use-checkpoint-args and no shape flags (128,384 rows at TP 1)
                                     (torchrun ... pretrain_gpt.py <Megatron's flags>, --use-checkpoint-args)
"""

from __future__ import annotations

from megalign.demo.run import EXAMPLES, SAMPLE_RESOURCE, add_arguments, main, sample_corpus

__all__ = ["EXAMPLES", "SAMPLE_RESOURCE", "add_arguments", "main", "sample_corpus"]
