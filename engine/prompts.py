"""Constant strings the released weights were trained and evaluated with (docs/rvr.md §2)."""

# Inference system prompt of the released RvR app and eval scripts (187 chars, sha256 prefix dbb330a2ae7ea6e9).
REFINE_SYSTEM_PROMPT = (
    "Analyze the potential misalignment between the generated image and the user's prompt. "
    "Then, re-generate the image to precisely align with the user's prompt.\n\n"
    "Here is the generated image:\n"
)

# The training-code variant (157 chars, sha256 prefix 193f8fb9eb212007); used by the training recipe.
REFINE_SYSTEM_PROMPT_TRAIN = (
    "Analyze the potential misalignment between the generated image and the user's prompt. "
    "Then, re-generate the image to precisely align with the user's prompt.\n"
)

# User template, with its trailing space; the prompt is inserted verbatim.
REFINE_PROMPT = "Here is the user's prompt: {user_prompt}. "

# Yes/no alignment question for the judge (docs/rvr.md §8).
JUDGE_QUESTION = "Does this image show: {prompt}? Answer yes or no."
