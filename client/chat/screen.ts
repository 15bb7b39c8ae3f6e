/**
 * The client's output. On a terminal, a line that arrives while the user is typing (a message,
 * a notice) is written above the prompt, and the prompt is drawn again below it with what was
 * typed so far and the cursor where it was: incoming chat never clobbers the line being typed.
 * Through a pipe, lines are written as they come and there is no prompt.
 */
import { clearScreenDown, cursorTo, type Interface, moveCursor } from 'node:readline';
import type { Style } from './style.ts';

export class Screen {
  private rl: Interface | undefined;

  constructor(
    private readonly out: NodeJS.WritableStream,
    readonly style: Style,
  ) {}

  /** From now on lines go above this readline prompt (interactive mode only). */
  attach(rl: Interface): void {
    this.rl = rl;
  }

  get interactive(): boolean {
    return this.rl !== undefined;
  }

  /** Writes one or more lines. */
  line(text: string): void {
    const rl = this.rl;
    if (!rl) {
      this.out.write(`${text}\n`);
      return;
    }
    // Go to where the prompt starts (the typed line may wrap over several rows), clear it, write
    // the text, then let readline draw the prompt and the typed line again, cursor preserved.
    const { rows } = rl.getCursorPos();
    if (rows > 0) moveCursor(this.out, 0, -rows);
    cursorTo(this.out, 0);
    clearScreenDown(this.out);
    this.out.write(`${text}\n`);
    // readline moves up by the rows of its last drawing before it redraws; that drawing is gone.
    (rl as unknown as { prevRows: number }).prevRows = 0;
    rl.prompt(true);
  }

  /** Changes the prompt (it shows the current room) and draws it again. */
  setPrompt(prompt: string): void {
    if (!this.rl) return;
    if (this.rl.getPrompt() === prompt) return;
    const { rows } = this.rl.getCursorPos();
    if (rows > 0) moveCursor(this.out, 0, -rows);
    cursorTo(this.out, 0);
    clearScreenDown(this.out);
    (this.rl as unknown as { prevRows: number }).prevRows = 0;
    this.rl.setPrompt(prompt);
    this.rl.prompt(true);
  }
}
