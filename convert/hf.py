"""Converts Hugging Face model directories to param trees, and back.

Import: one pretrained and a folder of fine-tuned HF directories (model_type
roberta, bert, gpt2, clip_vision_model or clip), all validated before anything
is written:

  python -m convert.hf --pretrained hf/roberta-base --finetuned hf/glue --out ckpt/roberta

writes ckpt/roberta/pretrained/ and ckpt/roberta/<name>/ per fine-tuned model
(config.json + params/, see `adarank_jax.interop.converted`). Export: a converted (or
merged) model directory back to an HF directory that transformers'
`from_pretrained` loads:

  python -m convert.hf --export ckpt/roberta/cola --out hf/cola_roundtrip

The logic lives in `adarank_jax.interop.hf`.
"""

import argparse
import sys

import tqdm

from adarank_jax.interop import hf


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m convert.hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--pretrained", help="HF directory of the pretrained model")
  parser.add_argument("--finetuned", help="directory whose sub-directories are fine-tuned HF models")
  parser.add_argument("--export", help="converted model directory (config.json + params/) to export")
  parser.add_argument("--out", required=True, help="output directory (must not exist for import)")
  args = parser.parse_args(argv)
  if args.export is not None:
    if args.pretrained is not None or args.finetuned is not None:
      parser.error("--export excludes --pretrained/--finetuned")
    hf.export(args.export, args.out)
    print(f"wrote {args.out}")
    return
  if args.pretrained is None or args.finetuned is None:
    parser.error("import needs both --pretrained and --finetuned (or use --export)")
  finetuned = hf.finetuned_directories(args.finetuned)
  hf.convert(
    args.pretrained,
    finetuned,
    args.out,
    progress=lambda items, desc: tqdm.tqdm(items, desc=desc, unit="model", file=sys.stderr),
  )
  print(f"wrote {args.out}: pretrained + {len(finetuned)} fine-tuned models")


if __name__ == "__main__":
  main()
