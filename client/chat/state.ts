/**
 * What makes the client feel like the chat seed's although a session may be in many rooms
 * (PROTOCOL.md §4): a current room, where plain text goes (the default room after login,
 * the room of the last `/join`, the default room again after `/leave`), the rooms this
 * connection joined (joined again after a reconnection), and the eids already shown, so that
 * the replay of a room on rejoin and qos-1 redeliveries are not shown twice (PROTOCOL.md §5:
 * clients deduplicate by eid).
 */

/** How many eids are remembered for deduplication. */
const SEEN_MAX = 4096;

export class ChatState {
  /** Where plain text goes; undefined before login. */
  current: string | undefined;
  /** Rooms joined on this connection, in the order joined. */
  readonly joined = new Set<string>();
  private readonly seen = new Set<string>();

  /** The default room: joined at login, returned to by `/leave`, never left. */
  constructor(readonly defaultRoom: string) {}

  get inRoom(): boolean {
    return this.current !== undefined;
  }

  /** A session was bound to the connection: the gateway put it in the default room. */
  loggedIn(): void {
    this.joined.clear();
    this.joined.add(this.defaultRoom);
    this.current = this.defaultRoom;
  }

  /** No session any more (logout, revoke, a failed resume). */
  loggedOut(): void {
    this.joined.clear();
    this.current = undefined;
  }

  joinedRoom(room: string): void {
    this.joined.add(room);
    this.current = room;
  }

  /** Left `room`; if it was the current room, the default room is current again. */
  leftRoom(room: string): void {
    this.joined.delete(room);
    if (this.current === room) this.current = this.defaultRoom;
  }

  /** True the first time an eid is seen. */
  firstSight(eid: string): boolean {
    if (this.seen.has(eid)) return false;
    this.seen.add(eid);
    if (this.seen.size > SEEN_MAX) this.seen.delete(this.seen.values().next().value as string);
    return true;
  }
}
