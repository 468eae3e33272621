"""A shopping-list agent: each session keeps its own list, no globals.

    python examples/per_session_state.py serve            # talk to it in the browser playground
    python examples/per_session_state.py run speech.wav   # or feed it audio files

`create_userdata` makes the per-session state; tools and hooks reach it as `ctx.userdata`.
"""

from agent import Agent, RunContext, UserTurn, tool


@tool
def add_item(ctx: RunContext, item: str) -> str:
    """Add an item to the user's shopping list."""
    ctx.userdata["items"].append(item)
    return f"{item} added; {len(ctx.userdata['items'])} items on the list"


@tool
def read_list(ctx: RunContext) -> list[str]:
    """The items on the user's shopping list."""
    return list(ctx.userdata["items"])


class ShoppingList(Agent):
    """Keeps a shopping list per conversation."""

    def create_userdata(self) -> dict:
        return {"items": [], "turns": 0}

    async def on_user_turn(self, ctx: RunContext, turn: UserTurn) -> str | None:
        ctx.userdata["turns"] += 1
        return None  # the model answers (and may call the tools)


agent = ShoppingList(instructions="You keep the user's shopping list. Use the tools.",
                     tools=[add_item, read_list], description=__doc__)

if __name__ == "__main__":
    raise SystemExit(agent.cli())
