"""``secompress push EXPORT --repo-id ORG/NAME [--public] [--dry-run]``: upload an export folder (with its
model card) to the Hugging Face Hub; the token comes from ``HF_TOKEN`` or the stored login, never printed."""
from __future__ import annotations

from .args import add_command


def _add(sub) -> None:
    p = add_command(sub, "push", "upload an export folder to the Hugging Face Hub")
    p.add_argument("folder", help="the export (e.g. out/NAME/model)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--message", default="Upload compressed model (secompress)", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")


def _run(args) -> int:
    from pathlib import Path

    from ..errors import SecompressError
    from ..recipe.publish import check_push, push
    from ..recipe.schema import PushStage

    folder = Path(args.folder)
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise SecompressError(f"'{folder}' is not an export folder (config.json and safetensors files)")
    if not (folder / "README.md").is_file():
        raise SecompressError(f"'{folder}' has no README.md model card: push the model/ folder a secompress run wrote")
    stage = PushStage(repo_id=args.repo_id, private=not args.public, commit_message=args.message)
    check_push(stage, args.dry_run)
    files = push(folder, stage, args.dry_run)
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(files)} files to {args.repo_id}: {', '.join(files)}")
    return 0


COMMAND = (_add, _run)
