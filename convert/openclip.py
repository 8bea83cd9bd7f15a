r"""OpenCLIP checkpoints <-> adarank_jax param trees.

Import (pretrained + every fine-tuned checkpoint, all validated before anything is written):
  python -m convert.openclip --config ViT-B-32 --pretrained zeroshot.pt \
      --finetuned checkpoints/ViT-B-32/ --out trees/ViT-B-32 [--with-text] [--run-pickled-code]
  -> trees/ViT-B-32/pretrained, trees/ViT-B-32/<task> (image towers), each a converted directory:
     open_clip_config.json (the model config, unchanged) + params/ (the tree), see adarank_jax.interop.converted

Export (a converted directory back to an OpenCLIP state dict):
  python -m convert.openclip --export trees/ViT-B-32/dtd --out dtd.safetensors [--prefix '']

--finetuned takes checkpoint files and folders: a folder contributes each checkpoint file in it
(task = file stem) and each subfolder holding one checkpoint (task = subfolder name).
"""

import argparse
import sys

import tqdm

from adarank_jax.interop import openclip


def _parse_args(argv):
  parser = argparse.ArgumentParser(
    prog="python -m convert.openclip",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--out", required=True, help="import: output folder of converted dirs; export: .safetensors or .pt file"
  )
  parser.add_argument("--config", help="OpenCLIP model config name (ViT-B-32) or JSON path")
  parser.add_argument("--pretrained", help="pretrained OpenCLIP checkpoint file")
  parser.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoint files or folders")
  parser.add_argument(
    "--with-text",
    action="store_true",
    help="also store the full pretrained CLIP (with text tower) as <out>/pretrained_clip",
  )
  parser.add_argument(
    "--run-pickled-code",
    action="store_true",
    help="allow checkpoints that pickle whole modules (runs code from the files)",
  )
  parser.add_argument(
    "--export", metavar="CONVERTED_DIR", help="export this converted dir instead of importing"
  )
  parser.add_argument(
    "--prefix",
    default=openclip.VISUAL_PREFIX,
    help="export: key prefix of an image-tower tree ('visual.' or '')",
  )
  args = parser.parse_args(argv)
  if args.export is None and not (args.config and args.pretrained and args.finetuned):
    parser.error("import needs --config, --pretrained and --finetuned (or use --export CONVERTED_DIR)")
  return args


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    if args.export is not None:
      openclip.export(args.export, args.out, prefix=args.prefix)
      print(f"wrote {args.out}")
      return 0
    written = openclip.convert_checkpoints(
      args.config,
      args.pretrained,
      openclip.find_checkpoints(args.finetuned),
      args.out,
      with_text=args.with_text,
      run_pickled_code=args.run_pickled_code,
      progress=lambda items, desc: tqdm.tqdm(items, desc=desc, file=sys.stderr),
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} converted models to {args.out}: {', '.join(p.name for p in written)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
